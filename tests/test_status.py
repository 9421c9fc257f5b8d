"""`status`: is every job running, succeeding and keeping up? Never green by default."""

from __future__ import annotations

import json
import re

import sqlalchemy as sa
from helpers import (
    DAY,
    HOUR,
    JOB_NAMES,
    MINUTE,
    SECRET,
    TASK_NAMES,
    events,
    invoke,
    put_history,
    run_cli,
    seed_operator_data,
    shown,
    unreachable_twin,
)

from skybot_cleanup.clock import utc_now
from skybot_cleanup.history import history_tables


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


def test_a_role_that_can_neither_read_nor_create_the_history_gets_unknown_and_exit_1(postgres, limited_role):
    """Without a history every job is UNKNOWN; the two whose runs would fail for want of
    DELETE (the fixture grants it on two tables only) are FAILING, whatever the history."""
    role, url = limited_role
    result = invoke("status", "--json", env={"DATABASE_URL": url})
    assert result.exit_code == 1
    jobs = {job["task"]: job for job in (json.loads(line) for line in result.stdout.splitlines())}
    failing = {"refresh-tokens", "revoked-tokens"}
    assert {name: job["health"] for name, job in jobs.items()} == {
        name: "FAILING" if name in failing else "UNKNOWN" for name in jobs
    }
    for name in failing:
        assert jobs[name]["error"].startswith(f'{role} lacks DELETE on "public"."RefreshToken": every {name} run')
    assert all(
        job["error"].startswith("no run history (")
        and job["error"].endswith("`skybot-cleanup check` says how to fix it")
        for name, job in jobs.items()
        if name not in failing
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
    assert (
        statuses["magic-links"]["error"]
        == f"table {shown(backend, 'MagicLink')} not found (setting SKYBOT_CLEANUP_MAGIC_LINK_TABLE)"
    )
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
    (event,) = events(result.stderr)
    assert (event["event"], event["level"]) == ("history_disabled", "warning")


def test_status_retries_a_transient_failure_within_a_short_budget():
    result = invoke(
        "status", env={"DATABASE_URL": "postgresql://skybot@127.0.0.1:1/app", "SKYBOT_CLEANUP_RETRY_DELAY_MS": "5000"}
    )
    assert result.exit_code == 1
    retries = [e for e in events(result.stderr) if e["event"] == "retrying"]
    assert len(retries) == 2 and all(e["delay_s"] <= 4 for e in retries)  # 1 s base, not 5 s


def test_status_json_hides_secrets_recorded_in_the_history_as_the_table_does(sqlite):
    """Whoever could write the history could have put a password there (or a failure
    quoted one): `status --json` redacts it like `status` and `history --json`."""
    seed_operator_data(sqlite)
    error = f"boom\x1b[2J at postgresql://app:{SECRET}@db.internal/app and hc-ping.com/{SECRET}/x"
    put_history(sqlite, ("refresh-tokens", "failed", HOUR), error=error)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": f"https://hc-ping.com/{SECRET}/{{task}}"}
    as_json = run_cli("status", "--json", env=env)
    table = run_cli("status", env=env)
    statuses = {s["task"]: s for s in map(json.loads, as_json.stdout.splitlines())}
    assert statuses["refresh-tokens"]["last_failure_error"] == (
        "OperationalError: boom\\x1b[2J at postgresql://app:***@db.internal/app and hc-ping.com/***/x"
    )
    for output in (as_json.stdout + as_json.stderr, table.stdout + table.stderr):
        assert SECRET not in output and "\x1b" not in output


def test_a_missing_delete_fails_every_run_even_with_nothing_due(postgres, limited_role):
    """Nothing is due, yet the run cannot work: exit 2 now, not on the day a row is due."""
    role, url = limited_role
    env = {"DATABASE_URL": url, "SKYBOT_CLEANUP_HISTORY": "false"}
    completed = run_cli("refresh-tokens", "--json", env=env)
    assert completed.returncode == 2, completed.stderr
    (failed,) = events(completed.stderr, "run_failed")
    assert failed["error"] == (
        f'{role} lacks DELETE on "public"."RefreshToken": every refresh-tokens run fails until it is granted '
        "(`skybot-cleanup check` prints the GRANT)"
    )
    assert run_cli("refresh-tokens", "--dry-run", env=env).returncode == 0  # SELECT is all a dry run needs
    assert run_cli("idempotency-keys", env=env).returncode == 0  # granted on that table
