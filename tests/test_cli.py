"""The command line as operators and cron use it: exit codes, messages, output, locks."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from conftest import CONSOLE_SCRIPT, run_cli
from skybot_cleanup import __version__
from skybot_cleanup.cleanup import utc_now
from skybot_cleanup.cli import app
from skybot_cleanup.demo import idempotency_key_row, refresh_token_row
from skybot_cleanup.schema import app_metadata

HOUR = timedelta(hours=1)
PASSWORD = "hunter2-Secret"


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def seed_tokens(backend, now=None) -> None:
    now = now or utc_now()
    backend.insert("RefreshToken", [
        refresh_token_row("expired_1", now - HOUR),
        refresh_token_row("expired_2", now - 5 * HOUR),
        refresh_token_row("live", now + HOUR),
        refresh_token_row("revoked_expired", now - HOUR, revoked=now - 2 * HOUR),
    ])


def log_events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_version():
    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"skybot-cleanup {__version__}\n")


def test_python_dash_m_works():
    completed = subprocess.run([str(CONSOLE_SCRIPT.with_name("python")), "-m", "skybot_cleanup", "--version"],
                               capture_output=True, text=True)
    assert (completed.returncode, completed.stdout) == (0, f"skybot-cleanup {__version__}\n")


def test_help_lists_every_task():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("idempotency-keys", "refresh-tokens", "magic-links", "revoked-tokens", "all", "demo"):
        assert name in result.stdout


@pytest.mark.parametrize("args, env, message", [
    (["refresh-tokens"], {},
     "no database URL: set DATABASE_URL or SKYBOT_CLEANUP_DATABASE_URL, or pass --database-url"),
    (["refresh-tokens"], {"DATABASE_URL": f"mysql://root:{PASSWORD}@localhost/app"},
     "DATABASE_URL scheme 'mysql' is not supported: use postgres://, postgresql:// or sqlite:///"),
    (["refresh-tokens", "--database-url", f"postgres://u:{PASSWORD}@host:notaport/db"], {},
     "DATABASE_URL is not a valid database URL"),
    (["revoked-tokens"], {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS": "0"},
     "invalid setting SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS: Input should be greater than or equal to 1"),
    (["revoked-tokens"], {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS": "1.5"},
     "invalid setting SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS: Input should be a valid integer, "
     "unable to parse string as an integer"),
    (["revoked-tokens"], {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS": "-1"},
     "invalid setting SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS: Input should be greater than or equal to 1"),
    (["refresh-tokens"], {"DATABASE_URL": "sqlite:///x.db",
                          "SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE": 'RefreshToken"; DROP TABLE x; --'},
     "invalid setting SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE: String should match pattern "
     "'^[A-Za-z_][A-Za-z0-9_$]{0,62}$'"),
    (["refresh-tokens"], {"DATABASE_URL": "sqlite:///x.db", "JOB_MAX_RETRIES": "many"},
     "invalid setting JOB_MAX_RETRIES: Input should be a valid integer, unable to parse string as an integer"),
    (["refresh-tokens"], {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_RETRY_DELAY_MS": "-5"},
     "invalid setting SKYBOT_CLEANUP_RETRY_DELAY_MS: Input should be greater than or equal to 0"),
    (["refresh-tokens"], {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_SCHEMA": "app-prod"},
     "invalid setting SKYBOT_CLEANUP_SCHEMA: String should match pattern '^[A-Za-z_][A-Za-z0-9_$]{0,62}$'"),
    (["refresh-tokens"], {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_LOG_FORMAT": "xml"},
     "invalid setting SKYBOT_CLEANUP_LOG_FORMAT: Input should be 'auto', 'json' or 'console'"),
])
def test_configuration_errors_exit_2_with_one_line(args, env, message):
    result = invoke(*args, env=env)
    assert result.exit_code == 2
    assert result.stderr == f"skybot-cleanup: error: {message}\n"
    assert result.stdout == ""
    assert PASSWORD not in result.output


def test_unknown_subcommand_is_a_usage_error():
    result = invoke("refresh-token")
    assert result.exit_code == 2
    assert "No such command 'refresh-token'" in result.stderr


def test_unreachable_database_exits_1_without_password_or_traceback():
    # Port 1 on loopback: refused at once.
    url = f"postgres://skybot:{PASSWORD}@127.0.0.1:1/app"
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": url, "SKYBOT_CLEANUP_RETRY_DELAY_MS": "10"})
    assert completed.returncode == 1
    assert completed.stdout == ""
    lines = completed.stderr.splitlines()
    assert lines[-1].startswith("skybot-cleanup: refresh-tokens failed: connection failed: ")
    assert "Connection refused" in lines[-1]
    events = log_events(completed.stderr)
    # Connection refused is transient: retried (3 times by default), then reported.
    assert [event["event"] for event in events] == ["retrying"] * 3 + ["run_failed", "run_finished"]
    assert {event["error_class"] for event in events[:3]} == {"OperationalError"}
    assert PASSWORD not in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("setting, value, message", [
    ("SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE", "RefreshTokens",
     'table {schema}"RefreshTokens" not found (setting SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE)'),
    ("SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN", "revoked_at",
     'column "revoked_at" not found in table {schema}"RefreshToken" '
     "(setting SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN)"),
])
def test_missing_table_or_column_is_a_configuration_error(backend, setting, value, message):
    result = invoke("refresh-tokens", "--json", env={"DATABASE_URL": backend.url, setting: value})
    assert result.exit_code == 2
    expected = message.format(schema="")
    assert json.loads(result.stdout)["error"] == expected
    assert result.stderr.splitlines()[-1] == f"skybot-cleanup: refresh-tokens failed: {expected}"


def test_renamed_tables_and_columns_are_settings(backend):
    renamed = {"SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE": "refresh_tokens",
               "SKYBOT_CLEANUP_REFRESH_TOKEN_EXPIRES_AT_COLUMN": "expires_at",
               "SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN": "revoked_at"}
    from skybot_cleanup.settings import load_settings

    settings = load_settings(**{k.removeprefix("SKYBOT_CLEANUP_").lower(): v for k, v in renamed.items()})
    table = app_metadata(settings).tables["refresh_tokens"]
    table.create(backend.engine)
    now = utc_now()
    with backend.engine.begin() as conn:
        conn.execute(table.insert(), [
            {**refresh_token_row("old", now - HOUR), "expires_at": now - HOUR, "revoked_at": None},
            {**refresh_token_row("new", now + HOUR), "expires_at": now + HOUR, "revoked_at": None},
        ])
    result = invoke("refresh-tokens", "--json", env={"DATABASE_URL": backend.url, **renamed})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 1
    with backend.engine.connect() as conn:
        assert set(conn.scalars(sa.select(table.c.id))) == {"new"}


def test_json_output_and_run_log(backend):
    seed_tokens(backend)
    result = invoke("refresh-tokens", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0
    (line,) = result.stdout.splitlines()
    output = json.loads(line)
    assert {k: output[k] for k in ("task", "status", "dry_run", "rows", "exit_code")} == {
        "task": "refresh-tokens", "status": "ok", "dry_run": False, "rows": 2, "exit_code": 0}
    assert output["cutoff"].endswith("Z") and isinstance(output["duration_ms"], int)
    (event,) = log_events(result.stderr)
    assert event["event"] == "run_finished"
    for key in ("task", "status", "rows", "dry_run", "cutoff", "duration_ms", "run_id"):
        assert event[key] == output[key], key
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}


def test_human_summary_and_dry_run(backend):
    seed_tokens(backend)
    result = invoke("refresh-tokens", "--dry-run", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0
    assert result.stdout.startswith("refresh-tokens: would delete 2 rows (cutoff ")
    assert backend.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}
    result = invoke("refresh-tokens", env={"DATABASE_URL": backend.url})
    assert result.stdout.startswith("refresh-tokens: deleted 2 rows (cutoff ")


def test_all_runs_every_task_in_order(backend):
    seed_tokens(backend)
    result = invoke("all", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["task"], o["rows"]) for o in outputs] == [
        ("idempotency-keys", 0), ("refresh-tokens", 2), ("magic-links", 0), ("revoked-tokens", 0)]
    assert len({o["run_id"] for o in outputs}) == 4


def test_all_exits_non_zero_when_one_task_fails(backend):
    seed_tokens(backend)
    result = invoke("all", "--json", env={"DATABASE_URL": backend.url,
                                          "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "MagicLinks"})
    assert result.exit_code == 2
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["task"], o["status"]) for o in outputs] == [
        ("idempotency-keys", "ok"), ("refresh-tokens", "ok"), ("magic-links", "failed"), ("revoked-tokens", "ok")]
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}


def test_env_file_with_the_apps_other_variables(backend, tmp_path):
    seed_tokens(backend)
    (tmp_path / ".env").write_text(
        f"NODE_ENV=production\nJWT_SECRET=abc\nPORT=3000\nDATABASE_URL={backend.url}\n"
        "JOB_MAX_RETRIES=3\nSKYBOT_CLEANUP_LOG_FORMAT=json\n"
    )
    result = invoke("refresh-tokens", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 2


def test_option_overrides_environment(backend):
    seed_tokens(backend)
    result = invoke("refresh-tokens", "--json", "--database-url", backend.url,
                    env={"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none"})
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_render_and_prisma_url_forms_with_schema(postgres, scheme):
    """Tables in a non-public schema, selected by Prisma's ?schema=, beside decoys in public."""
    now = utc_now()
    postgres.execute('CREATE SCHEMA "tenant_app"')
    metadata = app_metadata(schema="tenant_app")
    metadata.create_all(postgres.engine)
    with postgres.engine.begin() as conn:
        conn.execute(metadata.tables["tenant_app.RefreshToken"].insert(),
                     [refresh_token_row("app_expired", now - HOUR), refresh_token_row("app_live", now + HOUR)])
    postgres.insert("RefreshToken", [refresh_token_row("public_expired", now - HOUR)])
    url = sa.make_url(postgres.url).set(drivername=scheme, password=PASSWORD).render_as_string(hide_password=False)
    url += "?schema=tenant_app&connection_limit=5&pool_timeout=10&pgbouncer=true&socket_timeout=5"

    completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": url})

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["rows"] == 1
    assert PASSWORD not in completed.stdout + completed.stderr
    with postgres.engine.connect() as conn:
        left = set(conn.scalars(sa.text('SELECT id FROM tenant_app."RefreshToken"')))
    assert left == {"app_live"}
    assert postgres.ids("RefreshToken") == {"public_expired"}


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_console_script_in_far_time_zones(backend, zone):
    """Both the machine's and the session's zone far from UTC; real 'now'."""
    seed_tokens(backend)
    backend.insert("IdempotencyKey", [idempotency_key_row("ik_expired", utc_now() - HOUR),
                                      idempotency_key_row("ik_live", utc_now() + HOUR)])
    completed = run_cli("all", "--json", env={"DATABASE_URL": backend.url, "TZ": zone, "PGTZ": zone})
    assert completed.returncode == 0, completed.stderr
    rows = {o["task"]: o["rows"] for o in map(json.loads, completed.stdout.splitlines())}
    assert rows == {"idempotency-keys": 1, "refresh-tokens": 2, "magic-links": 0, "revoked-tokens": 0}
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}
    assert backend.ids("IdempotencyKey") == {"ik_live"}


def advisory_lock_sql(task: str) -> str:
    return f"SELECT pg_advisory_xact_lock(hashtextextended('skybot-cleanup:{task}', 0))"


def test_lock_held_by_another_run_skips_with_75(postgres):
    seed_tokens(postgres)
    with postgres.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql(advisory_lock_sql("refresh-tokens"))
        skipped = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": postgres.url})
        other_task = run_cli("idempotency-keys", env={"DATABASE_URL": postgres.url})
    assert skipped.returncode == 75
    output = json.loads(skipped.stdout)
    assert (output["status"], output["rows"]) == ("skipped", 0)
    assert skipped.stderr.splitlines()[-1] == (
        "skybot-cleanup: refresh-tokens skipped: another refresh-tokens run holds the lock; skipped")
    assert "run_skipped" in [event["event"] for event in log_events(skipped.stderr)]
    assert other_task.returncode == 0, other_task.stderr
    assert postgres.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}


def test_two_concurrent_runs_delete_each_row_once(postgres):
    """The first run blocks on a row the app holds; the second arrives meanwhile."""
    seed_tokens(postgres)
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "0"}
    with postgres.engine.connect() as app_conn:
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'expired_1' FOR UPDATE""")
        first = subprocess.Popen([str(CONSOLE_SCRIPT), "refresh-tokens", "--json"], env={"PATH": "/usr/bin", **env},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_lock_wait(postgres, "skybot-cleanup:refresh-tokens")
        second = run_cli("refresh-tokens", "--json", env=env)
        app_conn.rollback()
    out, err = first.communicate(timeout=60)
    assert (first.returncode, json.loads(out)["rows"]) == (0, 2), err
    assert (second.returncode, json.loads(second.stdout)["status"]) == (75, "skipped")
    assert postgres.ids("RefreshToken") == {"live", "revoked_expired"}


def wait_for_lock_wait(backend, application_name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with backend.engine.connect() as conn:
            waiting = conn.scalar(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND wait_event_type = 'Lock'"
                " AND datname = current_database()"),
                {"name": application_name})
        if waiting:
            return
        time.sleep(0.05)
    raise AssertionError(f"{application_name} never waited on a lock")


def test_sqlite_writer_lock_skips_with_75(sqlite, tmp_path):
    seed_tokens(sqlite)
    holder = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        completed = run_cli("refresh-tokens", env={"DATABASE_URL": sqlite.url,
                                                   "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "100"})
    finally:
        holder.rollback()
        holder.close()
    assert completed.returncode == 75
    assert completed.stderr.splitlines()[-1] == (
        "skybot-cleanup: refresh-tokens skipped: the SQLite database is locked by another writer; "
        "refresh-tokens skipped")
    assert sqlite.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}


def test_demo_on_a_fresh_directory(tmp_path):
    completed = run_cli("demo", "--path", str(tmp_path / "demo.db"))
    assert completed.returncode == 0, completed.stderr
    assert "refresh-tokens: deleted 2" in completed.stdout
    assert "    - rt_revoked_91d_ago" in completed.stdout
    assert "rt_revoked_89d_ago_kept_for_audit" in completed.stdout.split("Still there")[1]
    assert (tmp_path / "demo.db").exists()
    again = run_cli("demo", "--path", str(tmp_path / "demo.db"), "--json")
    removed = {o["task"]: o["removed"] for o in map(json.loads, again.stdout.splitlines())}
    assert removed == {
        "idempotency-keys": ["ik_expired_1h", "ik_expired_3d"],
        "refresh-tokens": ["rt_expired_10d", "rt_expired_1h"],
        "magic-links": ["ml_expired", "ml_expired_and_used", "ml_used"],
        "revoked-tokens": ["rt_revoked_200d_ago", "rt_revoked_91d_ago"],
    }


def test_demo_default_path_in_working_directory(tmp_path):
    completed = run_cli("demo", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "skybot-demo.db").exists()


def test_env_file_variable_for_cron_and_systemd(backend, tmp_path):
    """The file cron and systemd share: a Prisma URL with & and % needs no shell quoting."""
    seed_tokens(backend)
    url = backend.url + ("?schema=public&connection_limit=5&application_name=a%20b"
                         if backend.kind == "postgres" else "")
    env_file = tmp_path / "skybot-cleanup.env"
    env_file.write_text(f"DATABASE_URL={url}\nSKYBOT_CLEANUP_LOG_LEVEL=warning\n")
    completed = run_cli("refresh-tokens", "--json", env={"SKYBOT_CLEANUP_ENV_FILE": str(env_file)}, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["rows"] == 2
    assert completed.stderr == ""  # log level warning came from the file


def test_missing_env_file_is_a_configuration_error(tmp_path):
    result = invoke("refresh-tokens", env={"SKYBOT_CLEANUP_ENV_FILE": str(tmp_path / "nope.env")})
    assert result.exit_code == 2
    assert result.stderr == (f"skybot-cleanup: error: SKYBOT_CLEANUP_ENV_FILE names {tmp_path / 'nope.env'}, "
                             "which is not a readable file\n")


def test_our_retry_settings_win_over_the_apps(monkeypatch):
    from skybot_cleanup.settings import load_settings

    monkeypatch.setenv("JOB_MAX_RETRIES", "7")
    monkeypatch.setenv("JOB_RETRY_DELAY", "100")
    assert (load_settings().max_retries, load_settings().retry_delay_ms) == (7, 100)
    monkeypatch.setenv("SKYBOT_CLEANUP_MAX_RETRIES", "1")
    monkeypatch.setenv("SKYBOT_CLEANUP_RETRY_DELAY_MS", "20")
    assert (load_settings().max_retries, load_settings().retry_delay_ms) == (1, 20)
