"""The operator's view: metrics, textfile and Pushgateway, history, status, check, pings."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from conftest import run_cli
from skybot_cleanup.cleanup import utc_now
from skybot_cleanup.cli import app
from skybot_cleanup.demo import idempotency_key_row, magic_link_row, refresh_token_row
from skybot_cleanup.history import history_tables
from skybot_cleanup.tasks import TASKS

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)


def invoke(*args, env):
    return CliRunner().invoke(app, list(args), env=env)


def seed_operator_data(backend):
    now = utc_now()
    backend.insert("RefreshToken", [
        refresh_token_row("live_1", now + DAY), refresh_token_row("live_2", now + HOUR),
        refresh_token_row("revoked_live", now + DAY, revoked=now - HOUR),
        refresh_token_row("expired_3h", now - 3 * HOUR), refresh_token_row("expired_1h", now - HOUR),
        refresh_token_row("revoked_100d", now - 50 * DAY, revoked=now - 100 * DAY),
    ])
    backend.insert("MagicLink", [
        magic_link_row("ml_live", now + 10 * MINUTE), magic_link_row("ml_used", now + 10 * MINUTE, used=True),
        magic_link_row("ml_expired", now - 2 * HOUR),
    ])
    in_progress_new = {**idempotency_key_row("ik_running", now + DAY, status=None), "createdAt": now - MINUTE}
    in_progress_old = {**idempotency_key_row("ik_stuck", now + DAY, status=None), "createdAt": now - HOUR}
    backend.insert("IdempotencyKey", [in_progress_new, in_progress_old,
                                      idempotency_key_row("ik_done", now + DAY),
                                      idempotency_key_row("ik_expired", now - 4 * HOUR)])
    if backend.kind == "postgres":
        backend.execute("ANALYZE")


def test_metrics_snapshot_values(backend):
    seed_operator_data(backend)
    result = invoke("metrics", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    snapshot = json.loads(result.stdout)
    assert (snapshot["active_sessions"], snapshot["live_magic_links"]) == (2, 1)
    assert (snapshot["idempotency_keys_in_progress"], snapshot["idempotency_keys_stuck"]) == (2, 1)
    due = {name: task["due_rows"] for name, task in snapshot["tasks"].items()}
    assert due == {"idempotency-keys": 1, "refresh-tokens": 2, "magic-links": 2, "revoked-tokens": 1}
    ages = {name: task["oldest_due_age_seconds"] for name, task in snapshot["tasks"].items()}
    assert ages["refresh-tokens"] == pytest.approx(3 * 3600, abs=30)
    assert ages["idempotency-keys"] == pytest.approx(4 * 3600, abs=30)
    assert ages["magic-links"] == pytest.approx(2 * 3600, abs=30)
    assert ages["revoked-tokens"] == pytest.approx(10 * 86400, abs=30)
    assert {name: t["rows"] for name, t in snapshot["tables"].items()} == {
        "IdempotencyKey": 4, "RefreshToken": 6, "MagicLink": 3}
    assert all(t["rows_estimated"] == (backend.kind == "postgres") for t in snapshot["tables"].values())
    assert all(task["overdue"] and task["last_success_at"] is None for task in snapshot["tasks"].values())
    assert snapshot["database"]["latency_seconds"] < 1
    if backend.kind == "postgres":
        assert snapshot["database"]["size_bytes"] > 1_000_000
        assert all(t["size_bytes"] > 0 and t["last_analyze"] for t in snapshot["tables"].values())
    event = next(json.loads(line) for line in result.stderr.splitlines() if '"event": "metrics"' in line)
    assert event["active_sessions"] == 2


def test_metrics_textfile_parses_back(backend, tmp_path):
    seed_operator_data(backend)
    path = tmp_path / "textfile" / "skybot_cleanup.prom"
    path.parent.mkdir()
    result = invoke("metrics", "--prom-file", str(path), env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    text = path.read_text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("skybot_cleanup_active_sessions", ())] == 2
    assert samples[("skybot_cleanup_due_rows", (("task", "refresh-tokens"),))] == 2
    assert samples[("skybot_cleanup_due_rows", (("task", "magic-links"),))] == 2
    assert samples[("skybot_cleanup_task_overdue", (("task", "revoked-tokens"),))] == 1
    assert samples[("skybot_cleanup_table_rows", (("table", "MagicLink"),))] == 3
    # No timestamps on samples (node_exporter rejects them) and no temporary file left.
    assert all(len(line.split()) == 2 for line in text.splitlines() if not line.startswith("#"))
    assert [p.name for p in path.parent.iterdir()] == ["skybot_cleanup.prom"]


class Recorder(BaseHTTPRequestHandler):
    requests: list

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
    assert result.stderr.splitlines()[-1].startswith("skybot-cleanup: error: metrics were collected but not delivered")


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
    completed = run_cli("magic-links", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": url,
                                             "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "MagicLinks"})
    assert completed.returncode == 2
    assert [request[1].split("?")[0] for request in http_server.requests] == ["/magic-links/start", "/magic-links/2"]


def test_dead_ping_endpoint_never_fails_the_cleanup(sqlite):
    seed_operator_data(sqlite)
    started = time.monotonic()
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": sqlite.url,
                                               "SKYBOT_CLEANUP_PING_URL": "http://127.0.0.1:1/secret-uuid"})
    assert completed.returncode == 0
    assert time.monotonic() - started < 10
    assert "ping_failed" in completed.stderr and "secret-uuid" not in completed.stderr
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live", "revoked_100d"}


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
    assert sorted(r["run_id"] for r in history_rows(sqlite))[-1] == "young"
    assert "old" not in {r["run_id"] for r in history_rows(sqlite)}
    assert len(history_rows(sqlite)) == 3


@pytest.fixture
def limited_role(postgres, pg_admin):
    """A role that may read the app's tables but not delete, nor create schemas."""
    role = f"skybot_limited_{uuid.uuid4().hex[:8]}"
    database = postgres.engine.url.database
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC')
    postgres.execute(f'GRANT SELECT ON "IdempotencyKey", "RefreshToken", "MagicLink" TO "{role}"')
    postgres.execute(f'GRANT DELETE ON "IdempotencyKey", "MagicLink" TO "{role}"')
    yield sa.make_url(postgres.url).set(username=role).render_as_string(hide_password=False)
    postgres.execute(f'DROP OWNED BY "{role}"')
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'REVOKE ALL ON DATABASE "{database}" FROM "{role}"')
        postgres.engine.dispose()
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        conn.exec_driver_sql(f'DROP ROLE "{role}"')


def test_history_failure_is_a_warning_once_and_cleanup_succeeds(postgres, limited_role):
    seed_operator_data(postgres)
    completed = run_cli("all", "--json", env={"DATABASE_URL": limited_role, "SKYBOT_CLEANUP_RETRY_DELAY_MS": "1"})
    statuses = {o["task"]: (o["status"], o["rows"]) for o in map(json.loads, completed.stdout.splitlines())}
    # refresh-tokens and revoked-tokens lack DELETE: an error naming the privilege, exit 2.
    assert statuses == {"idempotency-keys": ("ok", 1), "refresh-tokens": ("failed", 0),
                        "magic-links": ("ok", 2), "revoked-tokens": ("failed", 0)}
    assert completed.returncode == 2
    assert "permission denied for table RefreshToken" in completed.stderr
    assert completed.stderr.count('"history_unavailable"') == 1
    assert postgres.ids("MagicLink") == {"ml_live"}


def put_history(backend, *runs: tuple[str, str, timedelta]) -> None:
    tables = history_tables(backend.engine.dialect.name, "skybot_cleanup")
    from skybot_cleanup.history import ensure_tables

    now = utc_now()
    with backend.engine.begin() as conn:
        ensure_tables(conn, tables, "skybot_cleanup")
        conn.execute(tables.runs.insert(), [
            {"run_id": str(uuid.uuid4()), "task": task, "status": status, "dry_run": False, "rows": 7,
             "cutoff": now - ago, "finished_at": now - ago, "duration_ms": 10,
             "exit_code": 0 if status == "ok" else 1, "host": "test",
             "error_class": None if status == "ok" else "OperationalError",
             "error": None if status == "ok" else "connection refused"}
            for task, status, ago in runs])


def test_status_healthy_exits_0(backend):
    put_history(backend, *[(task.name, "ok", 10 * MINUTE) for task in TASKS])
    result = invoke("status", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    statuses = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(s["task"], s["health"], s["last_success_rows"]) for s in statuses] == [
        (task.name, "OK", 7) for task in TASKS]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00:00Z", s["next_run_at"]) for s in statuses)


def test_status_overdue_and_failing_exit_1(backend):
    seed_operator_data(backend)
    put_history(backend,
                ("idempotency-keys", "ok", 3 * HOUR),  # hourly: more than two intervals ago
                ("refresh-tokens", "ok", 2 * HOUR), ("refresh-tokens", "failed", 10 * MINUTE),
                ("magic-links", "ok", 30 * HOUR),  # daily: still within two days
                )
    result = invoke("status", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 1
    statuses = {s["task"]: s for s in map(json.loads, result.stdout.splitlines())}
    assert {name: s["health"] for name, s in statuses.items()} == {
        "idempotency-keys": "OVERDUE", "refresh-tokens": "FAILING", "magic-links": "OK",
        "revoked-tokens": "OVERDUE"}
    assert statuses["refresh-tokens"]["last_failure_error"] == "OperationalError: connection refused"
    assert statuses["refresh-tokens"]["due_rows"] == 2
    table = invoke("status", env={"DATABASE_URL": backend.url}).stdout
    assert "FAILING" in table and "OVERDUE" in table and "never" in table


def test_status_after_real_runs(backend):
    seed_operator_data(backend)
    assert invoke("all", env={"DATABASE_URL": backend.url}).exit_code == 0
    result = invoke("status", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    rows = {s["task"]: (s["health"], s["last_success_rows"], s["due_rows"])
            for s in map(json.loads, result.stdout.splitlines())}
    assert rows == {"idempotency-keys": ("OK", 1, 0), "refresh-tokens": ("OK", 2, 0),
                    "magic-links": ("OK", 2, 0), "revoked-tokens": ("OK", 1, 0)}


def check_lines(result) -> list[tuple[str, str]]:
    return [(o["level"], o["message"]) for o in map(json.loads, result.stdout.splitlines())]


def test_check_on_the_apps_schema_warns_about_magic_link_index(postgres):
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 0, result.output
    lines = check_lines(result)
    assert lines[0][0] == "info" and lines[0][1].startswith("connected: PostgreSQL ")
    assert [level for level, _ in lines].count("error") == 0
    assert ("warning", 'magic-links: its predicate cannot use an index (each run scans the whole table); add: '
            'CREATE INDEX CONCURRENTLY "MagicLink_expiresAt_idx" ON "MagicLink" ("expiresAt"); '
            'CREATE INDEX CONCURRENTLY "MagicLink_used_idx" ON "MagicLink" ("used");') in lines
    for task in ("idempotency-keys", "refresh-tokens", "revoked-tokens"):
        assert ("ok", f"{task}: the planner can use an index for its predicate") in lines


def test_check_healthy_after_adding_the_suggested_indexes(postgres):
    postgres.execute('CREATE INDEX "MagicLink_expiresAt_idx" ON "MagicLink" ("expiresAt")')
    postgres.execute('CREATE INDEX "MagicLink_used_idx" ON "MagicLink" ("used")')
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 0
    assert {level for level, _ in check_lines(result)} == {"info", "ok"}


def test_check_missing_column_is_an_error(postgres):
    postgres.execute('ALTER TABLE "RefreshToken" RENAME COLUMN "revokedAt" TO "revoked_at"')
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 1
    assert ("error", 'column "revokedAt" not found in table "RefreshToken" '
                     "(setting SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN)") in check_lines(result)


def test_check_time_zone_aware_column_is_an_error(postgres):
    postgres.execute('ALTER TABLE "MagicLink" ALTER COLUMN "expiresAt" TYPE timestamptz')
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 1
    assert any(level == "error" and message.startswith(
        '"MagicLink"."expiresAt" is timestamp with time zone, expected timestamp without time zone')
        for level, message in check_lines(result))


def test_check_missing_privileges(postgres, limited_role):
    result = invoke("check", "--json", env={"DATABASE_URL": limited_role})
    assert result.exit_code == 1
    lines = check_lines(result)
    assert ("error", 'the connected role lacks DELETE on "RefreshToken": '
                     'GRANT DELETE ON "RefreshToken" TO current_user') in lines
    assert ("warning", 'run history: this role may not create schema "skybot_cleanup"; grant it, or set '
                       "SKYBOT_CLEANUP_HISTORY=false (status then has no history)") in lines


def test_check_warns_about_a_large_backlog(sqlite):
    seed_operator_data(sqlite)
    result = invoke("check", "--json", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_BACKLOG_WARNING_ROWS": "1"})
    assert result.exit_code == 0
    assert ("warning", "refresh-tokens: 2 rows are due; drain them once with "
                       "`skybot-cleanup refresh-tokens --batch-size 10000` before scheduling") in check_lines(result)


def test_cleanup_run_writes_its_textfile(sqlite, tmp_path):
    seed_operator_data(sqlite)
    result = invoke("all", "--prom-file", str(tmp_path), env={"DATABASE_URL": sqlite.url})
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == sorted(f"skybot_cleanup_{t.name}.prom" for t in TASKS)
    text = (tmp_path / "skybot_cleanup_refresh-tokens.prom").read_text()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["skybot_cleanup_last_rows"] == 2
    assert samples["skybot_cleanup_last_exit_code"] == 0
    assert abs(samples["skybot_cleanup_last_success_timestamp_seconds"] - time.time()) < 60


def test_failed_run_textfile_keeps_the_last_success_from_history(sqlite, tmp_path):
    seed_operator_data(sqlite)
    path = tmp_path / "{task}.prom"
    assert invoke("magic-links", "--prom-file", str(path), env={"DATABASE_URL": sqlite.url}).exit_code == 0
    failed = invoke("magic-links", "--prom-file", str(path),
                    env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_MAGIC_LINK_USED_COLUMN": "nope"})
    assert failed.exit_code == 2
    text = (tmp_path / "magic-links.prom").read_text()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["skybot_cleanup_last_exit_code"] == 2
    assert abs(samples["skybot_cleanup_last_success_timestamp_seconds"] - time.time()) < 60


def test_metrics_and_runs_share_the_prom_file_directory(sqlite, tmp_path):
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    assert invoke("metrics", env=env).exit_code == 0
    assert invoke("refresh-tokens", env=env).exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == [
        "skybot_cleanup_metrics.prom", "skybot_cleanup_refresh-tokens.prom"]
    # node_exporter rejects the same series in two files: the two kinds never share a name.
    names = [{f.name for f in text_string_to_metric_families(p.read_text())} for p in tmp_path.glob("*.prom")]
    assert not names[0] & names[1]


def test_metrics_snapshots_are_recorded(backend):
    seed_operator_data(backend)
    env = {"DATABASE_URL": backend.url}
    assert invoke("metrics", env=env).exit_code == 0
    assert invoke("metrics", "--no-history", env=env).exit_code == 0
    snapshots = history_tables(backend.engine.dialect.name, "skybot_cleanup").snapshots
    with backend.engine.connect() as conn:
        stored = [json.loads(text) for text in conn.scalars(sa.select(snapshots.c.snapshot))]
    assert len(stored) == 1
    assert stored[0]["active_sessions"] == 2 and stored[0]["tasks"]["refresh-tokens"]["due_rows"] == 2


def test_status_says_why_everything_is_overdue_without_history(sqlite):
    put_history(sqlite, *[(task.name, "ok", 10 * MINUTE) for task in TASKS])
    result = invoke("status", "--json", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_HISTORY": "false"})
    assert result.exit_code == 1
    assert {json.loads(line)["health"] for line in result.stdout.splitlines()} == {"OVERDUE"}
    (event,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert (event["event"], event["level"]) == ("history_disabled", "warning")
    assert "every task shows OVERDUE" in event["hint"]
