"""The command line as operators and cron use it: exit codes, messages, output, locks."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import CONSOLE_SCRIPT, run_cli, with_query
from typer.testing import CliRunner

from skybot_cleanup import __version__
from skybot_cleanup.cli import app
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import idempotency_key_row, insert_rows, refresh_token_row
from skybot_cleanup.schema import app_metadata
from skybot_cleanup.settings import load
from skybot_cleanup.tasks import REGISTRY

HOUR = timedelta(hours=1)
PASSWORD = "hunter2-Secret"
TASK_NAMES = [task.name for task in REGISTRY.tasks]


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def seed_tokens(backend, now=None) -> None:
    now = now or utc_now()
    backend.insert(
        "RefreshToken",
        [
            refresh_token_row("expired_1", now - HOUR),
            refresh_token_row("expired_2", now - 5 * HOUR),
            refresh_token_row("live", now + HOUR),
            refresh_token_row("revoked_expired", now - HOUR, revoked=now - 2 * HOUR),
        ],
    )


def log_events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def error_line(stderr: str) -> str:
    """The one line a failure ends with: its message, in JSON or plain form."""
    last = stderr.splitlines()[-1]
    if last.startswith("{"):
        event = json.loads(last)
        assert event["level"] == "error"
        return str(event["error"])
    assert last.startswith("skybot-cleanup: "), last
    return last.removeprefix("skybot-cleanup: ").removeprefix("error: ")


def test_version():
    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"skybot-cleanup {__version__}\n")


def test_python_dash_m_works():
    completed = subprocess.run(
        [str(CONSOLE_SCRIPT.with_name("python")), "-m", "skybot_cleanup", "--version"], capture_output=True, text=True
    )
    assert (completed.returncode, completed.stdout) == (0, f"skybot-cleanup {__version__}\n")


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in [*TASK_NAMES, "all", "metrics", "status", "check", "history", "config", "schedule", "demo"]:
        assert name in result.stdout


def test_task_help_gives_schedule_rule_variables_and_exit_codes_and_no_value_metavars():
    result = CliRunner().invoke(app, ["revoked-tokens", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    text = " ".join(result.stdout.split())
    assert "daily at 03:00 UTC (cron 0 3 * * *)" in text
    assert '"RefreshToken" rows with "revokedAt" < now - retention' in text
    assert "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS (default 90 days)" in text
    assert "SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN" in text
    assert "75 skipped" in text and "2 usage or configuration error" in text
    assert "<bool>" not in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["refresh-tokens"],
            {},
            "no database URL: set DATABASE_URL or SKYBOT_CLEANUP_DATABASE_URL, or pass --database-url",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": f"mysql://root:{PASSWORD}@localhost/app"},
            "DATABASE_URL scheme 'mysql' is not supported: use postgres://, postgresql:// or sqlite:///",
        ),
        (
            ["refresh-tokens", "--database-url", f"postgres://u:{PASSWORD}@host:notaport/db"],
            {},
            "DATABASE_URL is not a valid database URL (bad port)",
        ),
        (
            ["revoked-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS": "0"},
            "invalid setting SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS: Input should be greater than or equal to 1",
        ),
        (
            ["revoked-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS": "999999"},
            "invalid setting SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS: Input should be less than or equal to 36500",
        ),
        (
            ["revoked-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS": "1.5"},
            "invalid setting SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS: Input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE": 'RefreshToken"; DROP TABLE x; --'},
            "invalid setting SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE: String should match pattern "
            "'^[A-Za-z_][A-Za-z0-9_$]{0,62}$'",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "JOB_MAX_RETRIES": "many"},
            "invalid setting JOB_MAX_RETRIES: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_RETRY_DELAY_MS": "-5"},
            "invalid setting SKYBOT_CLEANUP_RETRY_DELAY_MS: Input should be greater than or equal to 0",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_BATCH_SIZE": "99999999999999999999"},
            "invalid setting SKYBOT_CLEANUP_BATCH_SIZE: Input should be less than or equal to 1000000",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "99999999999"},
            "invalid setting SKYBOT_CLEANUP_LOCK_TIMEOUT_MS: Input should be less than or equal to 86400000",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_SLEEP_MS": "999999999"},
            "invalid setting SKYBOT_CLEANUP_SLEEP_MS: Input should be less than or equal to 600000",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_IDEMPOTENCY_STUCK_MINUTES": "999999999999"},
            "invalid setting SKYBOT_CLEANUP_IDEMPOTENCY_STUCK_MINUTES: Input should be less than or equal to 525600",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_SLEEP_MS": "5000", "SKYBOT_CLEANUP_IDLE_TIMEOUT_S": "5"},
            "invalid settings: SKYBOT_CLEANUP_IDLE_TIMEOUT_S must be at least 1 s more than SKYBOT_CLEANUP_SLEEP_MS",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_SCHEMA": "app-prod"},
            "invalid setting SKYBOT_CLEANUP_SCHEMA: String should match pattern '^[A-Za-z_][A-Za-z0-9_$]{0,62}$'",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_LOG_FORMAT": "xml"},
            "invalid setting SKYBOT_CLEANUP_LOG_FORMAT: Input should be 'auto', 'json' or 'console'",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "postgresql://u@h/db?sslaccept=strict&sslmode=disable"},
            "DATABASE_URL: sslaccept=strict asks for a verified TLS connection, but sslmode=disable allows none",
        ),
    ],
)
def test_configuration_errors_exit_2_with_one_line(args, env, message):
    result = invoke(*args, env=env)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert error_line(result.stderr) == message
    assert result.stdout == ""
    assert PASSWORD not in result.output


def test_a_person_at_a_terminal_gets_a_plain_line():
    result = invoke("refresh-tokens", env={"SKYBOT_CLEANUP_LOG_FORMAT": "console"})
    assert result.stderr == (
        "skybot-cleanup: error: no database URL: set DATABASE_URL or "
        "SKYBOT_CLEANUP_DATABASE_URL, or pass --database-url\n"
    )


@pytest.mark.parametrize(
    ("variable", "value"), [("SKYBOT_CLEANUP_LOG_LEVEL", "DEBUG"), ("SKYBOT_CLEANUP_LOG_FORMAT", "JSON")]
)
def test_enumerated_settings_ignore_case(sqlite, variable, value):
    result = invoke("refresh-tokens", env={"DATABASE_URL": sqlite.url, variable: value})
    assert result.exit_code == 0, result.output


def test_unknown_subcommand_is_a_usage_error():
    result = invoke("refresh-token")
    assert result.exit_code == 2
    assert "No such command 'refresh-token'" in result.stderr


def test_unreachable_database_exits_1_after_jittered_retries_without_password_or_traceback():
    # Port 1 on loopback: refused at once, which may pass: retried.
    url = f"postgres://skybot:{PASSWORD}@127.0.0.1:1/app"
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": url, "SKYBOT_CLEANUP_RETRY_DELAY_MS": "10"})
    assert completed.returncode == 1
    assert completed.stdout == ""
    events = log_events(completed.stderr)
    assert [event["event"] for event in events] == ["retrying"] * 3 + ["run_failed", "run_finished"]
    assert {event["error_class"] for event in events[:3]} == {"OperationalError"}
    # Exponential with jitter: 10 ms, 20 ms, 40 ms, each plus up to 10 ms.
    for event, base in zip(events[:3], (0.01, 0.02, 0.04), strict=True):
        assert base <= event["delay_s"] <= base + 0.01
    assert "Connection refused" in events[3]["error"]
    assert PASSWORD not in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    ("url_change", "fragment"),
    [
        ({"username": "no_such_role_here"}, 'role "no_such_role_here" does not exist'),
        ({"database": "no_such_database_here"}, 'database "no_such_database_here" does not exist'),
    ],
)
def test_unknown_role_or_database_exits_2_at_once_without_retrying(postgres, url_change, fragment):
    url = sa.make_url(postgres.url).set(**url_change).render_as_string(hide_password=False)
    started = time.monotonic()
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": url})
    assert completed.returncode == 2, completed.stderr
    assert time.monotonic() - started < 3
    events = log_events(completed.stderr)
    assert "retrying" not in [event["event"] for event in events]
    failed = next(event for event in events if event["event"] == "run_failed")
    assert fragment in failed["error"] and "(check the" in failed["error"]


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (
            "SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE",
            "RefreshTokens",
            'table "RefreshTokens" not found (setting SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE)',
        ),
        (
            "SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN",
            "revoked_at",
            'column "revoked_at" not found in table "RefreshToken" '
            "(setting SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN)",
        ),
    ],
)
def test_missing_table_or_column_is_a_configuration_error(backend, setting, value, message):
    result = invoke("refresh-tokens", "--json", env={"DATABASE_URL": backend.url, setting: value})
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"] == message
    failed = next(event for event in log_events(result.stderr) if event["event"] == "run_failed")
    assert failed["error"] == message


def test_renamed_tables_and_columns_are_settings(backend):
    renamed = {
        "SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE": "refresh_tokens",
        "SKYBOT_CLEANUP_REFRESH_TOKEN_EXPIRES_AT_COLUMN": "expires_at",
        "SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN": "revoked_at",
    }
    settings = load({k.removeprefix("SKYBOT_CLEANUP_").lower(): v for k, v in renamed.items()}).settings
    metadata = app_metadata(settings)
    table = metadata.tables["refresh_tokens"]
    table.create(backend.engine)
    now = utc_now()
    rows = [
        {**refresh_token_row(id_, now + shift), "expires_at": now + shift, "revoked_at": None}
        for id_, shift in (("old", -HOUR), ("new", HOUR))
    ]
    with backend.engine.begin() as conn:
        insert_rows(
            conn,
            metadata,
            {"refresh_tokens": [{k: v for k, v in row.items() if k not in ("expiresAt", "revokedAt")} for row in rows]},
        )
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
        "task": "refresh-tokens",
        "status": "ok",
        "dry_run": False,
        "rows": 2,
        "exit_code": 0,
    }
    assert output["cutoff"].endswith("Z") and isinstance(output["duration_ms"], int)
    (event,) = log_events(result.stderr)
    assert event["event"] == "run_finished"
    for key in ("task", "status", "rows", "dry_run", "cutoff", "duration_ms", "run_id"):
        assert event[key] == output[key], key
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}


def test_human_summary_dry_run_and_quiet(backend):
    seed_tokens(backend)
    result = invoke("refresh-tokens", "--dry-run", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0
    assert result.stdout.startswith("refresh-tokens: would delete 2 rows (cutoff ")
    assert backend.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}
    quiet = invoke("refresh-tokens", "--quiet", env={"DATABASE_URL": backend.url})
    assert (quiet.exit_code, quiet.stdout) == (0, "")
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}


def test_all_runs_every_task_in_order(backend):
    seed_tokens(backend)
    result = invoke("all", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    expected = {name: 0 for name in TASK_NAMES} | {"refresh-tokens": 2}
    assert [(o["task"], o["rows"]) for o in outputs] == list(expected.items())
    assert len({o["run_id"] for o in outputs}) == len(TASK_NAMES)


def test_all_exits_non_zero_when_one_task_fails(backend):
    seed_tokens(backend)
    result = invoke("all", "--json", env={"DATABASE_URL": backend.url, "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "MagicLinks"})
    assert result.exit_code == 2
    outputs = {json.loads(line)["task"]: json.loads(line)["status"] for line in result.stdout.splitlines()}
    assert outputs == {name: "ok" for name in TASK_NAMES} | {"magic-links": "failed"}
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}


def test_env_file_with_the_apps_other_variables(backend, tmp_path):
    seed_tokens(backend)
    (tmp_path / ".env").write_text(
        f'NODE_ENV=production\nJWT_SECRET=abc\nPORT=3000\nDATABASE_URL="{backend.url}"\n'
        "JOB_MAX_RETRIES=3\nSKYBOT_CLEANUP_LOG_FORMAT=json\n"
        'PRIVATE_KEY="-----BEGIN KEY-----\nMIIB\n-----END KEY-----"\n'
    )
    result = invoke("refresh-tokens", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 2


def test_option_overrides_environment(backend):
    seed_tokens(backend)
    result = invoke(
        "refresh-tokens",
        "--json",
        "--database-url",
        backend.url,
        env={"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none"},
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_render_and_prisma_url_forms_with_schema(postgres, scheme):
    """Tables in a non-public schema, selected by Prisma's ?schema=, beside decoys in public."""
    now = utc_now()
    postgres.execute('CREATE SCHEMA "tenant_app"')
    metadata = app_metadata(schema="tenant_app")
    metadata.create_all(postgres.engine)
    with postgres.engine.begin() as conn:
        insert_rows(
            conn,
            metadata,
            {"RefreshToken": [refresh_token_row("app_expired", now - HOUR), refresh_token_row("app_live", now + HOUR)]},
            "tenant_app",
        )
    postgres.insert("RefreshToken", [refresh_token_row("public_expired", now - HOUR)])
    url = scheme + "://" + postgres.url.split("://", 1)[1]
    url = with_query(
        url,
        schema="tenant_app",
        connection_limit="5",
        pool_timeout="10",
        pgbouncer="true",
        socket_timeout="5",
        statement_cache_size="0",
    )

    completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": url})

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["rows"] == 1
    with postgres.engine.connect() as conn:
        left = set(conn.scalars(sa.text('SELECT id FROM tenant_app."RefreshToken"')))
    assert left == {"app_live"}
    assert postgres.ids("RefreshToken") == {"public_expired"}


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_console_script_in_far_time_zones(backend, zone):
    """Both the machine's and the session's zone far from UTC; real 'now'."""
    seed_tokens(backend)
    backend.insert(
        "IdempotencyKey",
        [idempotency_key_row("ik_expired", utc_now() - HOUR), idempotency_key_row("ik_live", utc_now() + HOUR)],
    )
    completed = run_cli("all", "--json", env={"DATABASE_URL": backend.url, "TZ": zone, "PGTZ": zone})
    assert completed.returncode == 0, completed.stderr
    rows = {o["task"]: o["rows"] for o in map(json.loads, completed.stdout.splitlines())}
    assert rows == {name: 0 for name in TASK_NAMES} | {"idempotency-keys": 1, "refresh-tokens": 2}
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}
    assert backend.ids("IdempotencyKey") == {"ik_live"}


def advisory_lock_sql(task: str) -> str:
    return f"SELECT pg_advisory_xact_lock(hashtextextended('skybot-cleanup:{task}', 0))"


def test_lock_held_by_another_run_skips_with_75_or_the_configured_code(postgres):
    seed_tokens(postgres)
    with postgres.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql(advisory_lock_sql("refresh-tokens"))
        skipped = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": postgres.url})
        mapped = run_cli("refresh-tokens", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_SKIPPED_EXIT_CODE": "0"})
        other_task = run_cli("idempotency-keys", env={"DATABASE_URL": postgres.url})
    assert skipped.returncode == 75
    output = json.loads(skipped.stdout)
    assert (output["status"], output["rows"]) == ("skipped", 0)
    (skip,) = [event for event in log_events(skipped.stderr) if event["event"] == "run_skipped"]
    assert skip["error"] == "another refresh-tokens run holds the lock; skipped"
    assert mapped.returncode == 0, mapped.stderr
    assert other_task.returncode == 0, other_task.stderr
    assert postgres.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}


def wait_for_lock_wait(backend, application: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with backend.engine.connect() as conn:
            if conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app AND wait_event_type = 'Lock'"
                ),
                {"app": application},
            ):
                return
        time.sleep(0.02)
    raise AssertionError("the run never waited for the app's row")


def test_two_concurrent_runs_delete_each_row_once(postgres):
    """The first run blocks on a row the app holds; the second arrives meanwhile."""
    seed_tokens(postgres)
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "0"}
    with postgres.engine.connect() as app_conn:
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'expired_1' FOR UPDATE""")
        first = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "refresh-tokens", "--json"],
            env={"PATH": "/usr/bin", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_lock_wait(postgres, "skybot-cleanup:refresh-tokens")
        second = run_cli("refresh-tokens", "--json", env=env)
        app_conn.rollback()
    out, err = first.communicate(timeout=60)
    assert (first.returncode, json.loads(out)["rows"]) == (0, 2), err
    assert (second.returncode, json.loads(second.stdout)["status"]) == (75, "skipped")
    assert postgres.ids("RefreshToken") == {"live", "revoked_expired"}


def test_missing_env_file_is_a_configuration_error(tmp_path):
    result = invoke("refresh-tokens", env={"SKYBOT_CLEANUP_ENV_FILE": str(tmp_path / "nope.env")})
    assert result.exit_code == 2
    assert error_line(result.stderr) == (
        f"SKYBOT_CLEANUP_ENV_FILE names {tmp_path / 'nope.env'}, which is not a readable file"
    )


def test_malformed_named_env_file_is_a_configuration_error(tmp_path):
    path = tmp_path / "env"
    path.write_text("DATABASE_URL=sqlite:///x.db\nthis is not an assignment\n")
    result = invoke("refresh-tokens", env={"SKYBOT_CLEANUP_ENV_FILE": str(path)})
    assert result.exit_code == 2
    assert error_line(result.stderr) == f"settings file {path}, line 2: expected KEY=value"


def test_env_file_values_are_literal(backend, tmp_path):
    """No interpolation, no quoting rules; CRLF, a BOM and `export` are tolerated."""
    seed_tokens(backend)
    secret = "pa$word${HOME}x&y%z#1"
    url = backend.url if backend.kind == "sqlite" else backend.url.replace("://", f"://postgres:{secret}@", 1)
    path = tmp_path / "env"
    path.write_bytes(
        (
            "\ufeff# settings\r\nexport DATABASE_URL=" + url + "\r\n"
            f"SKYBOT_CLEANUP_PING_URL=https://hc-ping.example/{secret}\r\n"
        ).encode()
    )
    settings = load(environ={"SKYBOT_CLEANUP_ENV_FILE": str(path), "HOME": "/root"}).settings
    assert settings.database_url is not None and settings.database_url.get_secret_value() == url
    assert settings.ping_url is not None and settings.ping_url.get_secret_value().endswith(secret)
    result = invoke("refresh-tokens", "--json", env={"SKYBOT_CLEANUP_ENV_FILE": str(path)})
    assert (result.exit_code, json.loads(result.stdout)["rows"]) == (0, 2), result.output
    assert secret not in result.output


def test_unknown_setting_is_a_warning_naming_the_closest(sqlite):
    result = invoke("revoked-tokens", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_REVOKED_RETENTION": "180"})
    assert result.exit_code == 0
    (warning,) = [event for event in log_events(result.stderr) if event["event"] == "unknown_setting"]
    assert warning == {
        **warning,
        "variable": "SKYBOT_CLEANUP_REVOKED_RETENTION",
        "level": "warning",
        "hint": "did you mean SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS?",
    }


def test_our_retry_settings_win_over_the_apps(monkeypatch):
    monkeypatch.setenv("JOB_MAX_RETRIES", "7")
    monkeypatch.setenv("JOB_RETRY_DELAY", "100")
    assert (load().settings.max_retries, load().settings.retry_delay_ms) == (7, 100)
    monkeypatch.setenv("SKYBOT_CLEANUP_MAX_RETRIES", "1")
    monkeypatch.setenv("SKYBOT_CLEANUP_RETRY_DELAY_MS", "20")
    assert (load().settings.max_retries, load().settings.retry_delay_ms) == (1, 20)


def test_config_shows_every_setting_its_source_and_no_secret(tmp_path):
    path = tmp_path / "env"
    path.write_text(f"SKYBOT_CLEANUP_BATCH_SIZE=500\nSKYBOT_CLEANUP_PING_URL=https://hc-ping.com/{PASSWORD}/x\n")
    result = invoke(
        "config",
        "--json",
        env={
            "SKYBOT_CLEANUP_ENV_FILE": str(path),
            "JOB_MAX_RETRIES": "4",
            "SKYBOT_CLEANUP_SLEEP_MS": "5",
            "DATABASE_URL": f"postgres://app:{PASSWORD}@db.internal:5432/skybot?schema=public",
            "SKYBOT_CLEANUP_BATCH_SIZ": "1",
        },
    )
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    settings = {entry["variable"]: entry for entry in view["settings"]}
    assert settings["SKYBOT_CLEANUP_DATABASE_URL"] == {
        "variable": "SKYBOT_CLEANUP_DATABASE_URL",
        "source": "environment (DATABASE_URL, the app's variable)",
        "value": "postgresql://app:***@db.internal:5432/skybot",
    }
    assert (settings["SKYBOT_CLEANUP_BATCH_SIZE"]["value"], settings["SKYBOT_CLEANUP_BATCH_SIZE"]["source"]) == (
        500,
        "settings file (SKYBOT_CLEANUP_BATCH_SIZE)",
    )
    assert settings["SKYBOT_CLEANUP_MAX_RETRIES"]["source"] == "environment (JOB_MAX_RETRIES, the app's variable)"
    assert settings["SKYBOT_CLEANUP_SLEEP_MS"]["source"] == "environment (SKYBOT_CLEANUP_SLEEP_MS)"
    assert settings["SKYBOT_CLEANUP_LOCK_TIMEOUT_MS"] == {
        "variable": "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS",
        "value": 5000,
        "source": "default",
    }
    assert settings["SKYBOT_CLEANUP_PING_URL"]["value"] == "***"
    assert view["unknown"] == [{"variable": "SKYBOT_CLEANUP_BATCH_SIZ", "closest": "SKYBOT_CLEANUP_BATCH_SIZE"}]
    assert view["settings_file"] == str(path)
    assert PASSWORD not in result.output
    table = invoke("config", env={"DATABASE_URL": f"postgres://app:{PASSWORD}@db/x"})
    assert "postgresql://app:***@db/x" in table.stdout and PASSWORD not in table.output


def test_an_unexpected_error_is_one_line_exit_1_without_traceback(tmp_path):
    """A directory where the SQLite file should be: nothing the tool classifies."""
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": f"sqlite:///{tmp_path}"})
    assert completed.returncode in (1, 2), completed.stderr
    assert "Traceback" not in completed.stderr
