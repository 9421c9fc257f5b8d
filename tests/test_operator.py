"""The operator's view: metrics, textfiles and the Pushgateway, history, status, check, pings."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa
from conftest import run_cli
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from skybot_cleanup.cli import app
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import idempotency_key_row, magic_link_row, refresh_token_row
from skybot_cleanup.history import ensure_tables, history_tables
from skybot_cleanup.tasks import REGISTRY

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)
TASK_NAMES = [task.name for task in REGISTRY.tasks]
JOB_NAMES = [job.name for job in REGISTRY.jobs]


def invoke(*args, env):
    return CliRunner().invoke(app, list(args), env=env)


def log_events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def seed_operator_data(backend):
    now = utc_now()
    backend.insert(
        "RefreshToken",
        [
            refresh_token_row("live_1", now + DAY),
            refresh_token_row("live_2", now + HOUR),
            refresh_token_row("revoked_live", now + DAY, revoked=now - HOUR),
            refresh_token_row("expired_3h", now - 3 * HOUR),
            refresh_token_row("expired_1h", now - HOUR),
            refresh_token_row("revoked_100d", now - 50 * DAY, revoked=now - 100 * DAY),
        ],
    )
    backend.insert(
        "MagicLink",
        [
            magic_link_row("ml_live", now + 10 * MINUTE),
            magic_link_row("ml_used", now + 10 * MINUTE, used=True),
            magic_link_row("ml_expired", now - 2 * HOUR),
        ],
    )
    in_progress_new = {**idempotency_key_row("ik_running", now + DAY, status=None), "createdAt": now - MINUTE}
    in_progress_old = {**idempotency_key_row("ik_stuck", now + DAY, status=None), "createdAt": now - HOUR}
    backend.insert(
        "IdempotencyKey",
        [
            in_progress_new,
            in_progress_old,
            idempotency_key_row("ik_done", now + DAY),
            idempotency_key_row("ik_expired", now - 4 * HOUR),
        ],
    )
    if backend.kind == "postgres":
        backend.execute("ANALYZE")


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_snapshot_values(backend):
    seed_operator_data(backend)
    result = invoke("metrics", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    snapshot = json.loads(result.stdout)
    assert snapshot["measures"] == {
        "active_sessions": 2,
        "live_magic_links": 1,
        "idempotency_keys_in_progress": 2,
        "idempotency_keys_stuck": 1,
    }
    tasks = {task["name"]: task for task in snapshot["tasks"]}
    assert {name: task["due_rows"] for name, task in tasks.items()} == {
        "idempotency-keys": 1,
        "refresh-tokens": 2,
        "magic-links": 2,
        "revoked-tokens": 1,
    }
    assert tasks["refresh-tokens"]["oldest_due_age_seconds"] == pytest.approx(3 * 3600, abs=30)
    assert tasks["idempotency-keys"]["oldest_due_age_seconds"] == pytest.approx(4 * 3600, abs=30)
    assert tasks["magic-links"]["oldest_due_age_seconds"] == pytest.approx(2 * 3600, abs=30)
    assert tasks["revoked-tokens"]["oldest_due_age_seconds"] == pytest.approx(10 * 86400, abs=30)
    assert {t["name"]: t["rows"] for t in snapshot["tables"]} == {
        "IdempotencyKey": 4,
        "RefreshToken": 6,
        "MagicLink": 3,
    }
    assert all(t["rows_estimated"] == (backend.kind == "postgres") for t in snapshot["tables"])
    # Never run, on a database the tool has only just seen: pending, not overdue.
    assert all(task["overdue"] is False and task["last_success_at"] is None for task in snapshot["tasks"])
    assert snapshot["errors"] == []
    assert snapshot["latency_seconds"] < 1
    if backend.kind == "postgres":
        assert snapshot["database_size_bytes"] > 1_000_000
        assert all(t["size_bytes"] > 0 and t["last_analyze"] for t in snapshot["tables"])
    event = next(e for e in log_events(result.stderr) if e["event"] == "metrics")
    assert event["measures"]["active_sessions"] == 2


def test_metrics_counts_past_the_cap_are_estimates(postgres):
    from skybot_cleanup import metrics

    now = utc_now()
    rows = [refresh_token_row(f"old_{i}", now - HOUR - i * MINUTE) for i in range(metrics.COUNT_CAP + 50)]
    postgres.insert("RefreshToken", rows)
    postgres.execute('ANALYZE "RefreshToken"')
    snapshot = json.loads(invoke("metrics", "--json", env={"DATABASE_URL": postgres.url}).stdout)
    task = next(t for t in snapshot["tasks"] if t["name"] == "refresh-tokens")
    assert task["due_rows_estimated"] is True
    assert task["due_rows"] == pytest.approx(metrics.COUNT_CAP + 50, rel=0.1)


def test_metrics_textfile_parses_back(backend, tmp_path):
    seed_operator_data(backend)
    path = tmp_path / "textfile" / "skybot_cleanup.prom"
    path.parent.mkdir()
    result = invoke("metrics", "--prom-file", str(path), env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    text = path.read_text()
    found = samples(text)
    assert found[("skybot_cleanup_active_sessions", ())] == 2
    assert found[("skybot_cleanup_due_rows", (("task", "refresh-tokens"),))] == 2
    assert found[("skybot_cleanup_due_rows", (("task", "magic-links"),))] == 2
    assert found[("skybot_cleanup_task_overdue", (("task", "revoked-tokens"),))] == 0
    assert found[("skybot_cleanup_table_rows", (("table", "MagicLink"),))] == 3
    assert abs(found[("skybot_cleanup_snapshot_timestamp_seconds", ())] - time.time()) < 60
    # No timestamps on samples (node_exporter rejects them), no temporary file left, and
    # readable by node_exporter's user whatever the umask.
    assert all(len(line.split()) == 2 for line in text.splitlines() if not line.startswith("#"))
    assert [p.name for p in path.parent.iterdir()] == ["skybot_cleanup.prom"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_metrics_degrade_per_task_when_a_table_is_missing(backend):
    seed_operator_data(backend)
    env = {"DATABASE_URL": backend.url, "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "MagicLinks"}
    result = invoke("metrics", "--json", env=env)
    assert result.exit_code == 1
    snapshot = json.loads(result.stdout)
    tasks = {task["name"]: task for task in snapshot["tasks"]}
    assert tasks["magic-links"]["error"] == 'table "MagicLinks" not found (setting SKYBOT_CLEANUP_MAGIC_LINK_TABLE)'
    assert tasks["refresh-tokens"]["due_rows"] == 2 and tasks["refresh-tokens"]["error"] is None
    assert snapshot["measures"]["live_magic_links"] is None and snapshot["measures"]["active_sessions"] == 2
    assert snapshot["errors"] == ['table "MagicLinks" not found (setting SKYBOT_CLEANUP_MAGIC_LINK_TABLE)']


class Recorder(BaseHTTPRequestHandler):
    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.server.requests.append((self.command, self.path, self.rfile.read(length).decode()))
        self.send_response(200)
        self.end_headers()

    do_GET = do_POST = do_PUT = _record

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_metrics_pushgateway(sqlite, http_server):
    seed_operator_data(sqlite)
    url = f"http://127.0.0.1:{http_server.server_port}"
    result = invoke("metrics", "--pushgateway", url, env={"DATABASE_URL": sqlite.url})
    assert result.exit_code == 0, result.output
    ((method, path, body),) = http_server.requests
    assert (method, path) == ("PUT", "/metrics/job/skybot_cleanup")
    assert 'skybot_cleanup_due_rows{task="refresh-tokens"} 2.0' in body


def test_unreachable_pushgateway_is_one_line_exit_1(sqlite):
    result = invoke("metrics", "--pushgateway", "http://127.0.0.1:1", env={"DATABASE_URL": sqlite.url})
    assert result.exit_code == 1
    failed = next(e for e in log_events(result.stderr) if e["event"] == "run_failed")
    assert failed["error"].startswith("metrics were collected but not delivered: URLError")


# -- heartbeats -------------------------------------------------------------------------------


def test_heartbeat_pings_start_and_exit_code(sqlite, http_server):
    seed_operator_data(sqlite)
    url = f"http://127.0.0.1:{http_server.server_port}/ping/{{task}}"
    completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": url})
    assert completed.returncode == 0, completed.stderr
    run_id = json.loads(completed.stdout)["run_id"]
    uuid.UUID(run_id)  # healthchecks.io wants a UUID for rid
    (start, end) = http_server.requests
    assert start == ("GET", f"/ping/refresh-tokens/start?rid={run_id}", "")
    assert end[:2] == ("POST", f"/ping/refresh-tokens/0?rid={run_id}")
    assert end[2].startswith("task=refresh-tokens status=ok rows=2 duration_ms=")


def test_heartbeat_reports_the_failure_exit_code(sqlite, http_server):
    url = f"http://127.0.0.1:{http_server.server_port}/{{task}}"
    completed = run_cli(
        "magic-links",
        env={
            "DATABASE_URL": sqlite.url,
            "SKYBOT_CLEANUP_PING_URL": url,
            "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "MagicLinks",
        },
    )
    assert completed.returncode == 2
    assert [request[1].split("?")[0] for request in http_server.requests] == ["/magic-links/start", "/magic-links/2"]


@pytest.mark.parametrize(
    "ping_url",
    [
        "http://127.0.0.1:1/secret-key-uuid",
        "hc-ping.com/secret-key-uuid/{task}",
        "https://hc-ping.com/secret-key-uuid /{task}",
        "https://:80:80/secret-key-uuid",
    ],
)
def test_a_bad_or_dead_ping_url_never_fails_the_cleanup_nor_shows_its_key(sqlite, ping_url):
    seed_operator_data(sqlite)
    started = time.monotonic()
    completed = run_cli("all", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": ping_url})
    assert completed.returncode == 0, completed.stderr
    assert time.monotonic() - started < 15
    warnings = [e for e in log_events(completed.stderr) if e["event"] in ("ping_failed", "ping_url_invalid")]
    assert warnings
    assert "secret-key-uuid" not in completed.stderr + completed.stdout
    if not ping_url.startswith("http://127"):
        assert [e["event"] for e in warnings] == ["ping_url_invalid"]  # once, not once per task
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live"}


# -- history ----------------------------------------------------------------------------------


def history_rows(backend) -> list[dict]:
    runs = history_tables(backend.engine.dialect.name, "skybot_cleanup").runs
    with backend.engine.connect() as conn:
        return [dict(row) for row in conn.execute(sa.select(runs).order_by(runs.c.id)).mappings()]


def test_history_records_every_kind_of_run(backend):
    seed_operator_data(backend)
    env = {"DATABASE_URL": backend.url}
    assert invoke("refresh-tokens", "--dry-run", env=env).exit_code == 0
    assert invoke("refresh-tokens", env=env).exit_code == 0
    assert invoke("magic-links", env={**env, "SKYBOT_CLEANUP_MAGIC_LINK_USED_COLUMN": "usedd"}).exit_code == 2
    assert invoke("idempotency-keys", "--no-history", env=env).exit_code == 0
    rows = history_rows(backend)
    assert [(r["task"], r["status"], r["dry_run"], r["rows"], r["exit_code"]) for r in rows] == [
        ("refresh-tokens", "ok", True, 2, 0),
        ("refresh-tokens", "ok", False, 2, 0),
        ("magic-links", "failed", False, 0, 2),
    ]
    assert rows[2]["error_class"] == "ConfigError" and "usedd" in rows[2]["error"]
    assert len({r["run_id"] for r in rows}) == 3 and all(r["host"] for r in rows)


def test_history_is_pruned_by_retention(sqlite):
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_HISTORY_RETENTION_DAYS": "30"}
    assert invoke("refresh-tokens", env=env).exit_code == 0
    runs = history_tables("sqlite", "skybot_cleanup").runs
    old = {**history_rows(sqlite)[0], "id": None, "run_id": "old", "finished_at": utc_now() - 31 * DAY}
    young = {**old, "run_id": "young", "finished_at": utc_now() - 29 * DAY}
    with sqlite.engine.begin() as conn:
        conn.execute(runs.insert(), [{k: v for k, v in row.items() if k != "id"} for row in (old, young)])
    assert invoke("refresh-tokens", env=env).exit_code == 0
    assert {r["run_id"] for r in history_rows(sqlite)} >= {"young"}
    assert "old" not in {r["run_id"] for r in history_rows(sqlite)}
    assert len(history_rows(sqlite)) == 3


def test_an_unreachable_database_run_reaches_the_history_with_the_next_run(postgres, tmp_path):
    """Spooled in the state directory, then recorded with its real time and error."""
    seed_operator_data(postgres)
    state = tmp_path / "state-dir"
    down = run_cli(
        "refresh-tokens",
        env={
            "DATABASE_URL": "postgresql://skybot@127.0.0.1:1/app",
            "SKYBOT_CLEANUP_STATE_DIR": str(state),
            "SKYBOT_CLEANUP_MAX_RETRIES": "0",
        },
    )
    assert down.returncode == 1
    spooled = list((state / "pending-runs").glob("*.json"))
    assert len(spooled) == 1
    # The database the failed run was meant for is back (same host, same database name).
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)}
    # Re-point the spooled record at this test database, as if it had been down.
    record = json.loads(spooled[0].read_text())
    from skybot_cleanup.db import parse_database_url

    record["database"] = parse_database_url(postgres.url).identity
    spooled[0].write_text(json.dumps(record))
    up = run_cli("refresh-tokens", env=env)
    assert up.returncode == 0, up.stderr
    assert list((state / "pending-runs").glob("*")) == []
    rows = history_rows(postgres)
    assert [(r["status"], r["exit_code"], r["error_class"]) for r in rows] == [
        ("failed", 1, "OperationalError"),
        ("ok", 0, None),
    ]
    assert rows[0]["finished_at"] < rows[1]["finished_at"]
    status = invoke("status", "--json", env={"DATABASE_URL": postgres.url})
    job = next(json.loads(line) for line in status.stdout.splitlines() if '"refresh-tokens"' in line)
    assert job["last_failure_error"].startswith("OperationalError: ")
    listed = invoke("history", "--json", "--status", "failed", env={"DATABASE_URL": postgres.url})
    (failed, summary) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (failed["task"], failed["status"], failed["error_class"]) == ("refresh-tokens", "failed", "OperationalError")
    assert summary == {
        "summary": "refresh-tokens",
        "runs": 1,
        "failures": 1,
        "rows_deleted": 0,
        "last_run_at": failed["finished_at"],
    }


def test_history_command_lists_filters_and_summarises(backend):
    seed_operator_data(backend)
    env = {"DATABASE_URL": backend.url}
    assert invoke("all", env=env).exit_code == 0
    assert invoke("magic-links", env={**env, "SKYBOT_CLEANUP_MAGIC_LINK_USED_COLUMN": "nope"}).exit_code == 2
    result = invoke("history", "--json", env=env)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    runs = [line for line in lines if "summary" not in line]
    assert [run["task"] for run in runs] == ["magic-links", *reversed(TASK_NAMES)]  # newest first
    assert runs[0]["status"] == "failed" and "nope" in runs[0]["error"]
    summary = {
        line["summary"]: (line["runs"], line["failures"], line["rows_deleted"]) for line in lines if "summary" in line
    }
    assert summary == {
        "idempotency-keys": (1, 0, 1),
        "magic-links": (2, 1, 2),
        "refresh-tokens": (1, 0, 2),
        "revoked-tokens": (1, 0, 1),
    }
    only = invoke("history", "--json", "--task", "refresh-tokens", "--since", "1h", "--limit", "5", env=env)
    assert [json.loads(line).get("task") for line in only.stdout.splitlines()] == ["refresh-tokens", None]
    table = invoke("history", env=env).stdout
    assert "magic-links: 2 runs, 1 failed, 2 rows deleted" in table
    assert invoke("history", "--status", "weird", env=env).exit_code == 2


def test_history_needs_no_database_create_privilege_when_its_schema_exists(postgres, pg_admin):
    """A DBA created the schema for the tool's role in advance (CREATE on the schema,
    not on the database): history works, and check says so."""
    seed_operator_data(postgres)
    role = f"skybot_hist_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'REVOKE CREATE ON DATABASE "{postgres.database}" FROM PUBLIC')
    try:
        postgres.execute(f'GRANT SELECT, DELETE ON "IdempotencyKey", "RefreshToken", "MagicLink" TO "{role}"')
        postgres.execute(f'CREATE SCHEMA skybot_cleanup AUTHORIZATION "{role}"')
        url = sa.make_url(postgres.url).set(username=role).render_as_string(hide_password=False)
        check = invoke("check", "--json", env={"DATABASE_URL": url})
        findings = [json.loads(line) for line in check.stdout.splitlines()]
        assert ("ok", 'run history: "skybot_cleanup"."runs" is writable (created on the first run)') in [
            (f["level"], f["message"]) for f in findings
        ]
        completed = run_cli("refresh-tokens", env={"DATABASE_URL": url})
        assert completed.returncode == 0 and "history_unavailable" not in completed.stderr, completed.stderr
        assert [r["status"] for r in history_rows(postgres)] == ["ok"]
    finally:
        postgres.execute(f'DROP SCHEMA IF EXISTS skybot_cleanup CASCADE; DROP OWNED BY "{role}"')
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP ROLE "{role}"')


@pytest.fixture
def limited_role(postgres, pg_admin):
    """A role that may read the app's tables but not delete from two, nor create schemas."""
    role = f"skybot_limited_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'REVOKE CREATE ON DATABASE "{postgres.database}" FROM PUBLIC')
    postgres.execute(f'GRANT SELECT ON "IdempotencyKey", "RefreshToken", "MagicLink" TO "{role}"')
    postgres.execute(f'GRANT DELETE ON "IdempotencyKey", "MagicLink" TO "{role}"')
    yield role, sa.make_url(postgres.url).set(username=role).render_as_string(hide_password=False)
    postgres.execute(f'DROP OWNED BY "{role}"')
    with pg_admin.connect() as conn:
        postgres.engine.dispose()
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{postgres.database}" WITH (FORCE)')
        conn.exec_driver_sql(f'DROP ROLE "{role}"')


def test_history_failure_is_a_warning_once_and_cleanup_succeeds(postgres, limited_role, tmp_path):
    seed_operator_data(postgres)
    _role, url = limited_role
    completed = run_cli(
        "all",
        "--json",
        env={
            "DATABASE_URL": url,
            "SKYBOT_CLEANUP_RETRY_DELAY_MS": "1",
            "SKYBOT_CLEANUP_STATE_DIR": str(tmp_path / "state"),
        },
    )
    statuses = {o["task"]: (o["status"], o["rows"]) for o in map(json.loads, completed.stdout.splitlines())}
    # refresh-tokens and revoked-tokens lack DELETE: an error naming the privilege, exit 2.
    assert statuses == {
        "idempotency-keys": ("ok", 1),
        "refresh-tokens": ("failed", 0),
        "magic-links": ("ok", 2),
        "revoked-tokens": ("failed", 0),
    }
    assert completed.returncode == 2
    failed = next(e for e in log_events(completed.stderr) if e["event"] == "run_failed")
    assert failed["error"] == (
        "permission denied for table RefreshToken (`skybot-cleanup check` prints the GRANT this role needs)"
    )
    assert completed.stderr.count('"history_unavailable"') == 1
    # Not lost: each run waits in the state directory for a history it can write.
    assert len(list((tmp_path / "state" / "pending-runs").glob("*.json"))) == 4
    assert postgres.ids("MagicLink") == {"ml_live"}


# -- status -----------------------------------------------------------------------------------


def put_history(backend, *runs: tuple[str, str, timedelta], first_seen: timedelta = 10 * DAY) -> None:
    tables = history_tables(backend.engine.dialect.name, "skybot_cleanup")
    now = utc_now()
    with backend.engine.begin() as conn:
        ensure_tables(conn, tables, "skybot_cleanup")
        conn.execute(tables.meta.update().values(value=(now - first_seen).isoformat() + "Z"))
        if runs:
            conn.execute(
                tables.runs.insert(),
                [
                    {
                        "run_id": str(uuid.uuid4()),
                        "task": task,
                        "status": status,
                        "dry_run": False,
                        "rows": 7,
                        "cutoff": now - ago,
                        "finished_at": now - ago,
                        "duration_ms": 10,
                        "exit_code": 0 if status == "ok" else 1,
                        "host": "test",
                        "error_class": None if status == "ok" else "OperationalError",
                        "error": None if status == "ok" else "connection refused",
                    }
                    for task, status, ago in runs
                ],
            )
        conn.execute(tables.snapshots.insert(), {"taken_at": now - 2 * MINUTE, "host": "test", "snapshot": "{}"})


def test_status_on_a_brand_new_database_is_pending_and_exits_0(backend):
    result = invoke("status", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    statuses = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(s["task"], s["health"]) for s in statuses] == [(name, "PENDING") for name in JOB_NAMES]
    assert "grace of 30 min" in invoke("status", env={"DATABASE_URL": backend.url}).stdout


def test_status_healthy_exits_0(backend):
    put_history(backend, *[(name, "ok", 10 * MINUTE) for name in TASK_NAMES])
    result = invoke("status", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    statuses = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(s["task"], s["health"], s["last_success_rows"]) for s in statuses] == [
        *((name, "OK", 7) for name in TASK_NAMES),
        ("metrics", "OK", None),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00\.000Z", s["next_run_at"]) for s in statuses)


def test_status_overdue_and_failing_exit_1(backend):
    seed_operator_data(backend)
    put_history(
        backend,
        ("idempotency-keys", "ok", 3 * HOUR),  # hourly: more than two intervals ago
        ("refresh-tokens", "ok", 2 * HOUR),
        ("refresh-tokens", "failed", 10 * MINUTE),
        ("magic-links", "ok", 30 * HOUR),  # daily: still within two days
    )
    result = invoke("status", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 1
    statuses = {s["task"]: s for s in map(json.loads, result.stdout.splitlines())}
    assert {name: s["health"] for name, s in statuses.items()} == {
        "idempotency-keys": "OVERDUE",
        "refresh-tokens": "FAILING",
        "magic-links": "OK",
        "revoked-tokens": "OVERDUE",
        "metrics": "OK",
    }
    assert statuses["refresh-tokens"]["last_failure_error"] == "OperationalError: connection refused"
    assert statuses["refresh-tokens"]["due_rows"] == 2
    table = invoke("status", env={"DATABASE_URL": backend.url}).stdout
    assert "FAILING" in table and "OVERDUE" in table and "never" in table


def test_status_after_real_runs(backend):
    seed_operator_data(backend)
    assert invoke("all", env={"DATABASE_URL": backend.url}).exit_code == 0
    assert invoke("metrics", env={"DATABASE_URL": backend.url}).exit_code == 0
    result = invoke("status", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    rows = {
        s["task"]: (s["health"], s["last_success_rows"], s["due_rows"])
        for s in map(json.loads, result.stdout.splitlines())
    }
    assert rows == {
        "idempotency-keys": ("OK", 1, 0),
        "refresh-tokens": ("OK", 2, 0),
        "magic-links": ("OK", 2, 0),
        "revoked-tokens": ("OK", 1, 0),
        "metrics": ("OK", None, None),
    }


def test_status_with_one_table_dropped_exits_1_and_still_reports_the_others(backend):
    put_history(backend, *[(name, "ok", 10 * MINUTE) for name in TASK_NAMES])
    backend.execute('DROP TABLE "MagicLink"')
    result = invoke("status", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 1
    statuses = {s["task"]: s for s in map(json.loads, result.stdout.splitlines())}
    assert statuses["magic-links"]["health"] == "FAILING"
    assert statuses["magic-links"]["error"] == 'table "MagicLink" not found (setting SKYBOT_CLEANUP_MAGIC_LINK_TABLE)'
    assert {name: s["health"] for name, s in statuses.items() if name != "magic-links"} == dict.fromkeys(
        [name for name in JOB_NAMES if name != "magic-links"], "OK"
    )


def test_status_without_history_is_unknown_never_green(sqlite):
    put_history(sqlite, *[(name, "ok", 10 * MINUTE) for name in TASK_NAMES])
    result = invoke("status", "--json", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_HISTORY": "false"})
    assert result.exit_code == 1
    jobs = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(job["health"], job["error"]) for job in jobs} == {
        ("UNKNOWN", "run history is off (SKYBOT_CLEANUP_HISTORY=false)")
    }
    (event,) = log_events(result.stderr)
    assert (event["event"], event["level"]) == ("history_disabled", "warning")


def test_status_retries_a_transient_failure_within_a_short_budget():
    started = time.monotonic()
    result = invoke(
        "status", env={"DATABASE_URL": "postgresql://skybot@127.0.0.1:1/app", "SKYBOT_CLEANUP_RETRY_DELAY_MS": "5000"}
    )
    assert result.exit_code == 1
    retries = [e for e in log_events(result.stderr) if e["event"] == "retrying"]
    assert len(retries) == 2 and all(e["delay_s"] <= 4 for e in retries)  # 1 s base, not 5 s
    assert time.monotonic() - started < 10


# -- check ------------------------------------------------------------------------------------


def check_findings(result) -> list[tuple[str, str]]:
    return [(f["level"], f["message"]) for f in map(json.loads, result.stdout.splitlines())]


def test_check_on_the_apps_schema(postgres):
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 0, result.output
    findings = [json.loads(line) for line in result.stdout.splitlines()]
    levels = {f["message"]: f["level"] for f in findings}
    assert levels['"public"."IdempotencyKey": the 4 columns the tool reads are present with compatible types'] == "ok"
    role = postgres.engine.url.username
    assert levels[f'{role} may SELECT and DELETE on "public"."RefreshToken" (all a cleanup needs; no UPDATE)'] == "ok"
    for name in ("idempotency-keys", "refresh-tokens", "revoked-tokens"):
        assert levels[f"{name}: the planner can use an index for its predicate"] == "ok"
    # The app's MagicLink has no index on expiresAt or used, but it is small: a line of
    # information, and no DDL at all (an index of ours would break Prisma's migrations).
    (magic,) = [f for f in findings if f["message"].startswith("magic-links: its predicate cannot use an index")]
    assert magic["level"] == "info" and magic["detail"] == []
    assert not any("CREATE INDEX" in f["message"] + " ".join(f["detail"]) for f in findings)
    assert ("ok", 'run history: "skybot_cleanup"."runs" is writable (created on the first run)') in [
        (f["level"], f["message"]) for f in findings
    ]
    # The probe rolled back: no history schema was left behind.
    with postgres.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM pg_namespace WHERE nspname = 'skybot_cleanup'")) == 0


def test_check_advises_a_schema_prisma_change_for_a_large_table(postgres):
    now = utc_now()
    postgres.insert("MagicLink", [magic_link_row(f"ml{i}", now + HOUR) for i in range(200)])
    postgres.execute('ANALYZE "MagicLink"')
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_INDEX_ADVICE_ROWS": "100"})
    (magic,) = [json.loads(line) for line in result.stdout.splitlines() if "magic-links: its predicate" in line]
    assert magic["level"] == "warning"
    assert "Add to `model MagicLink` in the app's prisma/schema.prisma" in magic["message"]
    assert magic["detail"][:2] == ["  @@index([expiresAt])", "  @@index([used])"]
    assert 'CREATE INDEX "MagicLink_expiresAt_idx" ON "MagicLink"("expiresAt");' in " ".join(magic["detail"])
    assert "CONCURRENTLY" not in " ".join(magic["detail"])


def test_check_reports_a_renamed_column_and_a_timestamptz_column(postgres):
    postgres.execute('ALTER TABLE "RefreshToken" RENAME COLUMN "revokedAt" TO "revoked_at"')
    postgres.execute('ALTER TABLE "IdempotencyKey" ALTER COLUMN "expiresAt" TYPE timestamptz')
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 1
    findings = check_findings(result)
    assert (
        "error",
        'column "revokedAt" not found in table "RefreshToken" (setting SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN)',
    ) in findings
    assert (
        "error",
        '"public"."IdempotencyKey"."expiresAt" is timestamp with time zone, expected timestamp '
        "without time zone (a time-zone-aware column would make every cutoff depend on the session's "
        "zone) (setting SKYBOT_CLEANUP_IDEMPOTENCY_KEY_EXPIRES_AT_COLUMN)",
    ) in findings


def test_check_names_the_connecting_role_in_every_grant(postgres, limited_role):
    role, url = limited_role
    result = invoke("check", "--json", env={"DATABASE_URL": url})
    assert result.exit_code == 1
    findings = [json.loads(line) for line in result.stdout.splitlines()]
    (missing,) = [f for f in findings if f["message"].startswith(f"{role} lacks DELETE on")]
    assert missing["detail"] == [f'GRANT DELETE ON "public"."RefreshToken" TO "{role}";']
    (history,) = [f for f in findings if f["message"].startswith("run history: cannot write")]
    assert history["level"] == "warning"
    assert history["detail"] == [f'CREATE SCHEMA "skybot_cleanup" AUTHORIZATION "{role}";']
    assert not any("current_user" in " ".join([f["message"], *f["detail"]]) for f in findings)


def test_check_warns_about_a_large_backlog(sqlite):
    seed_operator_data(sqlite)
    result = invoke("check", "--json", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_BACKLOG_WARNING_ROWS": "1"})
    assert result.exit_code == 0
    (warning,) = [json.loads(line) for line in result.stdout.splitlines() if "refresh-tokens: more than" in line]
    assert warning == {
        "level": "warning",
        "message": "refresh-tokens: more than 1 rows are due; drain them once in batches before scheduling:",
        "detail": ["skybot-cleanup refresh-tokens --batch-size 10000 --max-runtime 1800"],
    }


def test_check_on_a_read_only_database_is_an_error(postgres):
    postgres.execute(f'ALTER DATABASE "{postgres.database}" SET default_transaction_read_only = on')
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 1
    assert (
        "error",
        "the database is read-only (default_transaction_read_only is on): every cleanup would fail; "
        "point DATABASE_URL at the primary (with several hosts, add target_session_attrs=read-write)",
    ) in (check_findings(result))
    assert not any("writable" in message for _level, message in check_findings(result))


# -- textfiles --------------------------------------------------------------------------------


def test_cleanup_run_writes_its_textfile(sqlite, tmp_path):
    seed_operator_data(sqlite)
    result = invoke("all", "--prom-file", str(tmp_path), env={"DATABASE_URL": sqlite.url})
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == sorted(f"skybot_cleanup_{t}.prom" for t in TASK_NAMES)
    path = tmp_path / "skybot_cleanup_refresh-tokens.prom"
    found = {name: value for (name, _labels), value in samples(path.read_text()).items()}
    assert found["skybot_cleanup_last_rows"] == 2
    assert found["skybot_cleanup_last_exit_code"] == 0
    assert abs(found["skybot_cleanup_last_success_timestamp_seconds"] - time.time()) < 60
    assert found["skybot_cleanup_schedule_interval_seconds"] == 3600
    assert 0 < found["skybot_cleanup_next_run_timestamp_seconds"] - time.time() <= 3600
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_single_path_prom_file_keeps_one_file_per_task(sqlite, tmp_path):
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path / "skybot.prom")}
    assert invoke("refresh-tokens", env=env).exit_code == 0
    assert invoke("magic-links", env=env).exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == ["skybot_magic-links.prom", "skybot_refresh-tokens.prom"]


def last_success(path) -> float | None:
    return {name: value for (name, _), value in samples(path.read_text()).items()}.get(
        "skybot_cleanup_last_success_timestamp_seconds"
    )


def test_the_last_success_survives_failures_outages_dry_runs_and_bad_settings(sqlite, tmp_path):
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    path = tmp_path / "skybot_cleanup_magic-links.prom"
    assert invoke("magic-links", env=env).exit_code == 0
    succeeded = last_success(path)
    assert succeeded is not None
    os.umask(0o077)
    try:
        failed = invoke("magic-links", env={**env, "SKYBOT_CLEANUP_MAGIC_LINK_USED_COLUMN": "nope"})
        unreachable = run_cli(
            "magic-links",
            env={**env, "DATABASE_URL": "postgresql://u@127.0.0.1:1/x", "SKYBOT_CLEANUP_MAX_RETRIES": "0"},
        )
        dry = invoke("magic-links", "--dry-run", env=env)
        misconfigured = run_cli("magic-links", env={**env, "SKYBOT_CLEANUP_BATCH_SIZE": "0"})
    finally:
        os.umask(0o022)
    assert (failed.exit_code, unreachable.returncode, dry.exit_code, misconfigured.returncode) == (2, 1, 0, 2)
    assert last_success(path) == succeeded
    found = {name: value for (name, _), value in samples(path.read_text()).items()}
    assert found["skybot_cleanup_last_exit_code"] == 2  # the invalid setting, the newest outcome
    assert abs(found["skybot_cleanup_last_run_timestamp_seconds"] - time.time()) < 60
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_metrics_and_runs_share_the_prom_file_directory_without_sharing_a_series(sqlite, tmp_path):
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    assert invoke("metrics", env=env).exit_code == 0
    assert invoke("refresh-tokens", env=env).exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == [
        "skybot_cleanup_metrics.prom",  # the metrics job's run series
        "skybot_cleanup_refresh-tokens.prom",
        "skybot_cleanup_snapshot.prom",  # the metrics job's snapshot
    ]
    series = [set(samples(p.read_text())) for p in sorted(tmp_path.glob("*.prom"))]
    assert not (series[0] & series[1]) and not (series[0] & series[2]) and not (series[1] & series[2])
    assert ("skybot_cleanup_last_exit_code", (("task", "metrics"),)) in series[0]


def test_metrics_snapshots_are_recorded(backend):
    seed_operator_data(backend)
    env = {"DATABASE_URL": backend.url}
    assert invoke("metrics", env=env).exit_code == 0
    assert invoke("metrics", "--no-history", env=env).exit_code == 0
    snapshots = history_tables(backend.engine.dialect.name, "skybot_cleanup").snapshots
    with backend.engine.connect() as conn:
        stored = [json.loads(text) for text in conn.scalars(sa.select(snapshots.c.snapshot))]
    assert len(stored) == 1
    assert stored[0]["measures"]["active_sessions"] == 2
    assert next(t for t in stored[0]["tasks"] if t["name"] == "refresh-tokens")["due_rows"] == 2


def test_check_and_metrics_on_a_partitioned_table(postgres):
    from conftest import NOW
    from test_rules import PARTITIONED_REFRESH_TOKEN

    postgres.execute(PARTITIONED_REFRESH_TOKEN.format(old=NOW - 60 * DAY, soon=NOW + DAY))
    seed_operator_data(postgres)
    findings = check_findings(invoke("check", "--json", env={"DATABASE_URL": postgres.url}))
    assert (
        "info",
        '"public"."RefreshToken" is partitioned: the tasks delete row by row in every partition; '
        "detaching and dropping whole expired partitions is the app's migrations' job "
        "(docs/scaling.md)",
    ) in findings
    snapshot = json.loads(invoke("metrics", "--json", env={"DATABASE_URL": postgres.url}).stdout)
    table = next(t for t in snapshot["tables"] if t["name"] == "RefreshToken")
    assert (table["partitions"], table["rows"]) == (3, 6)
    assert table["size_bytes"] > 0 and table["last_analyze"]
    assert next(t for t in snapshot["tasks"] if t["name"] == "refresh-tokens")["due_rows"] == 2
