"""The metrics job: a cheap snapshot, per-task degradation, delivery, and its own run record."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from helpers import (
    HOUR,
    MINUTE,
    events,
    invoke,
    prom_values,
    run_cli,
    samples,
    seed_operator_data,
    shown,
    unreachable_twin,
)

from skybot_cleanup import db
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import refresh_token_row
from skybot_cleanup.history import history_tables
from skybot_cleanup.spool import PENDING_RUNS


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
    (spooled,) = (state / PENDING_RUNS).glob("*.json")
    assert json.loads(spooled.read_text())["task"] == "metrics"


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
    event = next(e for e in events(result.stderr) if e["event"] == "metrics")
    assert event["measures"]["active_sessions"] == 2


def test_metrics_counts_past_the_cap_are_estimates(postgres):

    now = utc_now()
    rows = [refresh_token_row(f"old_{i}", now - HOUR - i * MINUTE) for i in range(db.COUNT_CAP + 50)]
    postgres.insert("RefreshToken", rows)
    postgres.execute('ANALYZE "RefreshToken"')
    snapshot = json.loads(invoke("metrics", "--json", env={"DATABASE_URL": postgres.url}).stdout)
    task = next(t for t in snapshot["tasks"] if t["name"] == "refresh-tokens")
    assert task["due_rows_estimated"] is True
    assert task["due_rows"] == pytest.approx(db.COUNT_CAP + 50, rel=0.1)


def test_metrics_degrade_per_task_when_a_table_is_missing(backend):
    seed_operator_data(backend)
    env = {"DATABASE_URL": backend.url, "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "MagicLinks"}
    result = invoke("metrics", "--json", env=env)
    assert result.exit_code == 1
    snapshot = json.loads(result.stdout)
    tasks = {task["name"]: task for task in snapshot["tasks"]}
    missing = f"table {shown(backend, 'MagicLinks')} not found (setting SKYBOT_CLEANUP_MAGIC_LINK_TABLE)"
    assert tasks["magic-links"]["error"] == missing
    assert tasks["refresh-tokens"]["due_rows"] == 2 and tasks["refresh-tokens"]["error"] is None
    assert snapshot["measures"]["live_magic_links"] is None and snapshot["measures"]["active_sessions"] == 2
    assert snapshot["errors"] == [missing]


def test_metrics_pushgateway(sqlite, monitor):
    seed_operator_data(sqlite)
    url = f"http://127.0.0.1:{monitor.server_port}"
    result = invoke("metrics", "--pushgateway", url, env={"DATABASE_URL": sqlite.url})
    assert result.exit_code == 0, result.output
    ((method, path, body),) = monitor.requests
    assert (method, path) == ("PUT", "/metrics/job/skybot_cleanup")
    assert 'skybot_cleanup_due_rows{task="refresh-tokens"} 2.0' in body


def test_unreachable_pushgateway_is_one_line_exit_1(sqlite):
    result = invoke("metrics", "--pushgateway", "http://127.0.0.1:1", env={"DATABASE_URL": sqlite.url})
    assert result.exit_code == 1
    failed = next(e for e in events(result.stderr) if e["event"] == "run_failed")
    assert failed["error"].startswith("metrics were collected but not delivered: URLError")


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


def test_metrics_measure_every_task_they_can_when_one_table_is_unreadable(postgres, limited_role, tmp_path):
    """One missing grant must not freeze every backlog figure: the readable tasks are
    measured and written, the others say so (snapshot, textfile series, log), exit 1."""
    role, url = limited_role
    seed_operator_data(postgres)
    postgres.execute(f'REVOKE SELECT ON "RefreshToken" FROM "{role}"')
    completed = run_cli(
        "metrics", "--json", "--no-history", env={"DATABASE_URL": url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    )
    assert completed.returncode == 1, completed.stderr
    snapshot = json.loads(completed.stdout)
    tasks = {task["name"]: task for task in snapshot["tasks"]}
    assert (tasks["idempotency-keys"]["due_rows"], tasks["magic-links"]["due_rows"]) == (1, 2)
    for name in ("refresh-tokens", "revoked-tokens"):
        assert tasks[name]["due_rows"] is None
        # The catalog says so before any count is refused, and a run would fail the same way.
        assert tasks[name]["error"] == (
            f'{role} lacks SELECT and DELETE on "public"."RefreshToken": every {name} run fails until it is '
            "granted (`skybot-cleanup check` prints the GRANT)"
        )
    series = samples((tmp_path / "skybot_cleanup_snapshot.prom").read_text())
    assert {task: series[("skybot_cleanup_backlog_measured", (("task", task),))] for task in tasks} == {
        "idempotency-keys": 1,
        "refresh-tokens": 0,
        "magic-links": 1,
        "revoked-tokens": 0,
    }
    assert series[("skybot_cleanup_due_rows", (("task", "magic-links"),))] == 2
    assert ("skybot_cleanup_due_rows", (("task", "refresh-tokens"),)) not in series
    (finished,) = events(completed.stderr, "run_finished")
    assert (finished["task"], finished["status"], finished["exit_code"]) == ("metrics", "failed", 1)
    assert any(
        'lacks SELECT and DELETE on "public"."RefreshToken"' in e.get("error", "") for e in events(completed.stderr)
    )
