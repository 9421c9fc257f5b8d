"""Every failure leaves a true trace (exit code, log, history, textfile, heartbeat), and
no broken trace takes a cleanup down with it."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa
from conftest import run_cli
from test_batches import seed_due_and_live, start_cli, wait_until
from test_operator import (
    JOB_NAMES,
    history_rows,
    invoke,
    limited_role,  # noqa: F401 - a fixture
    samples,
    seed_operator_data,
)

from skybot_cleanup.clock import utc_now
from skybot_cleanup.db import parse_database_url
from skybot_cleanup.history import history_tables

DAY = timedelta(days=1)


def unreachable_twin(url: str) -> str:
    """The same user and database name (so the same history identity), on a server that is down."""
    parsed = sa.make_url(url)
    if "host" in parsed.query:  # a unix-socket URL
        parsed = parsed.update_query_dict({"host": "/nonexistent-skybot-socket"})
    else:
        parsed = parsed.set(host="127.0.0.1", port=1)
    return parsed.render_as_string(hide_password=False)


def prom_values(path) -> dict[str, float]:
    return {name: value for (name, _labels), value in samples(path.read_text()).items()}


# -- status: never green by default -----------------------------------------------------------


def test_a_database_no_run_ever_reached_turns_overdue_after_its_first_scheduled_time(sqlite):
    env = {"DATABASE_URL": sqlite.url}
    first = invoke("status", "--json", env=env)
    assert first.exit_code == 0, first.output
    assert {json.loads(line)["health"] for line in first.stdout.splitlines()} == {"PENDING"}
    # status itself recorded when it first saw the database ...
    meta = history_tables("sqlite", "skybot_cleanup").meta
    with sqlite.engine.begin() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(meta)) == 1
        # ... so once that is long past, with still no run, every job is overdue.
        conn.execute(meta.update().values(value=(utc_now() - 30 * DAY).isoformat() + "Z"))
    later = invoke("status", "--json", env=env)
    assert later.exit_code == 1
    assert [(s["task"], s["health"]) for s in map(json.loads, later.stdout.splitlines())] == [
        (name, "OVERDUE") for name in JOB_NAMES
    ]


def test_a_role_that_can_neither_read_nor_create_the_history_gets_unknown_and_exit_1(postgres, limited_role):  # noqa: F811
    _role, url = limited_role
    result = invoke("status", "--json", env={"DATABASE_URL": url})
    assert result.exit_code == 1
    jobs = [json.loads(line) for line in result.stdout.splitlines()]
    assert {job["health"] for job in jobs} == {"UNKNOWN"}
    assert all(
        job["error"].startswith("no run history (")
        and job["error"].endswith("`skybot-cleanup check` says how to fix it")
        for job in jobs
    )


def test_a_run_that_never_reached_the_database_makes_status_failing_on_that_host(postgres, tmp_path):
    seed_operator_data(postgres)
    state = str(tmp_path / "state-dir")
    down = run_cli(
        "refresh-tokens",
        env={
            "DATABASE_URL": unreachable_twin(postgres.url),
            "SKYBOT_CLEANUP_STATE_DIR": state,
            "SKYBOT_CLEANUP_MAX_RETRIES": "0",
        },
    )
    assert down.returncode == 1
    result = invoke("status", "--json", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": state})
    assert result.exit_code == 1
    health = {s["task"]: s["health"] for s in map(json.loads, result.stdout.splitlines())}
    assert health["refresh-tokens"] == "FAILING"
    assert {name: h for name, h in health.items() if name != "refresh-tokens"} == dict.fromkeys(
        [name for name in JOB_NAMES if name != "refresh-tokens"], "PENDING"
    )
    history = invoke("history", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": state})
    assert history.exit_code == 0, history.output
    assert history.stdout.endswith("(1 run waits in the state directory until a run reaches this database)\n")


# -- the spool and the state directory --------------------------------------------------------


def test_a_malformed_spool_file_is_set_aside_and_the_run_succeeds(sqlite, tmp_path):
    seed_operator_data(sqlite)
    spool = tmp_path / "state-dir" / "pending-runs"
    spool.mkdir(parents=True)
    identity = parse_database_url(sqlite.url).identity
    (spool / "20261101T000000000000-x.json").write_text(json.dumps({"database": identity, "run_id": "x"}))
    (spool / "20261101T000000000001-y.json").write_text("{not json")
    completed = run_cli(
        "refresh-tokens", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_STATE_DIR": str(spool.parent)}
    )
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in spool.iterdir()) == [
        "20261101T000000000000-x.json.bad",
        "20261101T000000000001-y.json.bad",
    ]
    assert [(r["task"], r["status"]) for r in history_rows(sqlite)] == [("refresh-tokens", "ok")]
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live", "revoked_100d"}


def test_a_stale_claim_of_a_dead_run_is_recorded_once(postgres, tmp_path):
    state = tmp_path / "state-dir"
    down = run_cli(
        "magic-links",
        env={
            "DATABASE_URL": unreachable_twin(postgres.url),
            "SKYBOT_CLEANUP_STATE_DIR": str(state),
            "SKYBOT_CLEANUP_MAX_RETRIES": "0",
        },
    )
    assert down.returncode == 1
    (spooled,) = (state / "pending-runs").glob("*.json")
    # A run that claimed it and was killed before recording it (pid 2**22 + 1 does not exist).
    spooled.rename(spooled.with_name(f"{spooled.name}.claimed-{2**22 + 1}"))
    completed = run_cli("magic-links", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)})
    assert completed.returncode == 0, completed.stderr
    assert [(r["task"], r["status"], r["exit_code"]) for r in history_rows(postgres)] == [
        ("magic-links", "failed", 1),
        ("magic-links", "ok", 0),
    ]
    assert list((state / "pending-runs").iterdir()) == []


# -- a failed start: bad settings still leave every trace -------------------------------------


class Recorder(BaseHTTPRequestHandler):
    def _record(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        self.server.requests.append((self.command, self.path, body))
        if self.server.hang(self.path):
            self.server.released.wait(60)  # a monitor that accepts and never answers
            return
        self.send_response(200)
        self.end_headers()

    do_GET = do_POST = _record

    def log_message(self, *args):
        pass


@pytest.fixture
def monitor():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.daemon_threads = True
    server.requests, server.released, server.hang = [], threading.Event(), lambda path: False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


def test_an_invalid_setting_in_the_settings_file_still_writes_the_textfile_pings_and_is_recorded(
    sqlite, tmp_path, monitor
):
    seed_operator_data(sqlite)
    prom = tmp_path / "textfiles"
    prom.mkdir()
    settings_file = tmp_path / "skybot-cleanup.env"
    settings_file.write_text(
        f"DATABASE_URL={sqlite.url}\n"
        f"SKYBOT_CLEANUP_PROM_FILE={prom}\n"
        f"SKYBOT_CLEANUP_PING_URL=http://127.0.0.1:{monitor.server_port}/{{task}}\n"
        f"SKYBOT_CLEANUP_STATE_DIR={tmp_path / 'state-dir'}\n"
        "SKYBOT_CLEANUP_BATCH_SIZE=0\n"
    )
    env = {"SKYBOT_CLEANUP_ENV_FILE": str(settings_file), "SKYBOT_CLEANUP_LOG_FORMAT": "console"}
    completed = run_cli("refresh-tokens", env=env)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and "SKYBOT_CLEANUP_BATCH_SIZE" in completed.stderr
    assert prom_values(prom / "skybot_cleanup_refresh-tokens.prom")["skybot_cleanup_last_exit_code"] == 2
    assert [(method, path.split("?")[0]) for method, path, _ in monitor.requests] == [("POST", "/refresh-tokens/2")]
    # The next good run records it, with its error, before its own.
    settings_file.write_text(settings_file.read_text().replace("BATCH_SIZE=0", "BATCH_SIZE=100"))
    assert run_cli("refresh-tokens", env=env).returncode == 0
    rows = history_rows(sqlite)
    assert [(r["task"], r["status"], r["exit_code"], r["error_class"]) for r in rows] == [
        ("refresh-tokens", "failed", 2, "ConfigError"),
        ("refresh-tokens", "ok", 0, None),
    ]
    assert "SKYBOT_CLEANUP_BATCH_SIZE" in rows[0]["error"]


def test_an_invalid_url_with_a_prom_file_option_writes_that_textfile(tmp_path):
    completed = run_cli(
        "all",
        "--prom-file",
        str(tmp_path),
        env={"DATABASE_URL": "mysql://u@host/app", "SKYBOT_CLEANUP_LOG_FORMAT": "console"},
    )
    assert completed.returncode == 2
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == sorted(
        f"skybot_cleanup_{name}.prom" for name in JOB_NAMES if name != "metrics"
    )
    assert {prom_values(p)["skybot_cleanup_last_exit_code"] for p in tmp_path.glob("*.prom")} == {2}
    assert "skybot_cleanup_last_success_timestamp_seconds" not in prom_values(
        tmp_path / "skybot_cleanup_refresh-tokens.prom"
    )


def test_a_dry_run_does_not_ping(sqlite, monitor):
    seed_operator_data(sqlite)
    url = f"http://127.0.0.1:{monitor.server_port}/{{task}}"
    completed = run_cli("all", "--dry-run", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": url})
    assert completed.returncode == 0, completed.stderr
    assert monitor.requests == []


# -- signals while a monitor hangs ------------------------------------------------------------


@pytest.mark.parametrize("phase", ["start", "end"])
def test_sigterm_while_a_ping_hangs_exits_143_and_keeps_every_trace(sqlite, tmp_path, monitor, phase):
    seed_operator_data(sqlite)
    monitor.hang = (lambda path: "/start" in path) if phase == "start" else (lambda path: "/start" not in path)
    process = start_cli(
        "refresh-tokens",
        "--json",
        env={
            "DATABASE_URL": sqlite.url,
            "SKYBOT_CLEANUP_PING_URL": f"http://127.0.0.1:{monitor.server_port}/{{task}}",
            "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path),
        },
    )
    wait_until(lambda: any(monitor.hang(path) for _, path, _ in monitor.requests), what=f"the {phase} ping")
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 143, stderr
    assert time.monotonic() - started < 5  # it did not wait for the ping to time out
    assert all(line.startswith("{") for line in stderr.splitlines())  # no traceback
    (row,) = history_rows(sqlite)
    values = prom_values(tmp_path / "skybot_cleanup_refresh-tokens.prom")
    if phase == "start":  # nothing was deleted: the run was interrupted before its work
        assert (row["status"], row["exit_code"], row["rows"]) == ("interrupted", 143, 0)
        assert json.loads(stdout)["status"] == "interrupted"
        assert values["skybot_cleanup_last_exit_code"] == 143
        assert sqlite.ids("RefreshToken") >= {"expired_3h", "expired_1h"}
    else:  # the work was done and recorded: the run's outcome stays true, the command says 143
        assert (row["status"], row["exit_code"], row["rows"]) == ("ok", 0, 2)
        assert values["skybot_cleanup_last_exit_code"] == 0
        assert "expired_3h" not in sqlite.ids("RefreshToken")


# -- the metrics job is a recorded run --------------------------------------------------------


def test_metrics_runs_are_in_the_history_and_have_their_run_textfile(sqlite, tmp_path):
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    assert invoke("metrics", env=env).exit_code == 0
    sqlite.execute('DROP TABLE "MagicLink"')
    failed = invoke("metrics", env=env)
    assert failed.exit_code == 1  # a task could not be measured
    listed = invoke("history", "--task", "metrics", "--json", env=env)
    assert listed.exit_code == 0, listed.output
    runs = [o for o in map(json.loads, listed.stdout.splitlines()) if "run_id" in o]
    assert [(r["status"], r["exit_code"]) for r in runs] == [("failed", 1), ("ok", 0)]  # newest first
    assert 'table "MagicLink" not found' in runs[0]["error"]
    values = prom_values(tmp_path / "skybot_cleanup_metrics.prom")
    assert values["skybot_cleanup_last_exit_code"] == 1
    assert values["skybot_cleanup_last_success_timestamp_seconds"] > 0


def test_metrics_on_an_unreachable_database_fails_and_is_spooled(postgres, tmp_path):
    state = tmp_path / "state-dir"
    completed = run_cli(
        "metrics",
        "--prom-file",
        str(tmp_path / "snapshot.prom"),
        env={
            "DATABASE_URL": unreachable_twin(postgres.url),
            "SKYBOT_CLEANUP_STATE_DIR": str(state),
            "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path),
            "SKYBOT_CLEANUP_MAX_RETRIES": "0",
        },
    )
    assert completed.returncode == 1
    assert prom_values(tmp_path / "skybot_cleanup_metrics.prom")["skybot_cleanup_last_exit_code"] == 1
    assert not (tmp_path / "snapshot.prom").exists()
    (spooled,) = (state / "pending-runs").glob("*.json")
    assert json.loads(spooled.read_text())["task"] == "metrics"


# -- settings and URLs ------------------------------------------------------------------------


def test_libpq_options_in_the_url_survive(postgres):
    seed_operator_data(postgres)
    url = postgres.url + ("&" if "?" in postgres.url else "?") + "options=-c%20TimeZone%3DPacific/Kiritimati"
    completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": url})
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["rows"] == 2
    assert postgres.ids("RefreshToken") == {"live_1", "live_2", "revoked_live", "revoked_100d"}


@pytest.mark.parametrize(
    ("since", "code", "fragment"),
    [
        ("2026-11-01T00:00Z", 0, None),
        ("1h", 0, None),
        ("99999999999d", 2, "--since"),
        ("yesterday", 2, "--since"),
    ],
)
def test_history_since_takes_a_timestamp_or_a_duration(sqlite, since, code, fragment):
    assert invoke("refresh-tokens", env={"DATABASE_URL": sqlite.url}).exit_code == 0
    result = invoke("history", "--since", since, "--json", env={"DATABASE_URL": sqlite.url})
    assert result.exit_code == code, result.output
    if fragment:
        assert fragment in result.stderr and "Traceback" not in result.output
    else:
        assert any(
            o.get("task") == "refresh-tokens" and "run_id" in o for o in map(json.loads, result.stdout.splitlines())
        )


def test_check_says_when_the_role_may_not_use_the_apps_schema(postgres, limited_role):  # noqa: F811
    role, url = limited_role
    postgres.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    result = invoke("check", "--json", env={"DATABASE_URL": url})
    assert result.exit_code == 1
    findings = [json.loads(line) for line in result.stdout.splitlines()]
    (usage,) = [f for f in findings if "no USAGE" in f["message"]]
    assert usage == {
        "level": "error",
        "message": f'{role} may not use schema "public" (no USAGE), so none of its tables can be seen: '
        "as its owner or a superuser, run",
        "detail": [f'GRANT USAGE ON SCHEMA "public" TO "{role}";'],
    }


def test_the_demo_refuses_a_sqlite_file_holding_someone_elses_tables(tmp_path):
    path = tmp_path / "precious.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE invoices (id integer)")
    engine.dispose()
    completed = run_cli("demo", "--path", str(path), env={"SKYBOT_CLEANUP_LOG_FORMAT": "console"})
    assert completed.returncode == 2
    assert completed.stderr == (
        f"skybot-cleanup: error: refusing to replace {path}: it holds tables the demo did not make "
        "(invoices); give a new file\n"
    )
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM sqlite_master").scalars().all() == ["invoices"]
    engine.dispose()


# -- batches ----------------------------------------------------------------------------------


def test_many_held_rows_cannot_stretch_a_run_past_max_runtime(postgres):
    due, live = seed_due_and_live(postgres, due=400)
    with postgres.engine.connect() as app_conn:
        # The app holds every fifth due row: each costs a probe of up to 100 ms.
        app_conn.exec_driver_sql(
            """SELECT 1 FROM "RefreshToken" WHERE left(id, 4) = 'due_' AND right(id, 1) IN ('0', '5') FOR UPDATE"""
        )
        started = time.monotonic()
        completed = run_cli(
            "refresh-tokens",
            "--batch-size",
            "200",
            "--max-runtime",
            "2",
            "--json",
            env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "200"},
        )
        elapsed = time.monotonic() - started
        app_conn.rollback()
    result = json.loads(completed.stdout)
    assert completed.returncode == 0, completed.stderr
    assert result["stopped_by"] == "max_runtime"
    assert elapsed < 6
    left = postgres.ids("RefreshToken")
    held = {row_id for row_id in due if row_id[-1] in "05"}
    assert left >= live | held
    assert result["remaining"] == len(left & due) and result["rows"] == 400 - len(left & due)


# -- logs -------------------------------------------------------------------------------------


def test_a_library_error_with_a_traceback_is_one_json_event(capsys):
    from skybot_cleanup.logs import configure_logging

    configure_logging("json")
    try:
        raise OSError("the connection is lost\nwith a second line")
    except OSError:
        logging.getLogger("sqlalchemy.pool.impl.NullPool").error("Exception during reset or similar", exc_info=True)
    (line,) = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert {key: event[key] for key in ("event", "level", "logger", "message", "error")} == {
        "event": "library_log",
        "level": "error",
        "logger": "sqlalchemy.pool.impl.NullPool",
        "message": "Exception during reset or similar",
        "error": "OSError: the connection is lost",
    }


def test_debug_shows_the_traceback_of_a_failed_run_and_still_its_one_line(sqlite):
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "Nope"}
    env["SKYBOT_CLEANUP_LOG_FORMAT"] = "console"
    quiet = run_cli("magic-links", env=env)
    debugging = run_cli("magic-links", env={**env, "SKYBOT_CLEANUP_DEBUG": "1"})
    assert quiet.returncode == debugging.returncode == 2
    assert "Traceback (most recent call last)" not in quiet.stderr
    assert "Traceback (most recent call last)" in debugging.stderr
    assert 'magic-links failed: table "Nope" not found' in debugging.stderr.splitlines()[-1]
