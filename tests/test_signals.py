"""Signals and kills: SIGTERM ends a run cleanly, kill -9 loses at most the open batch."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import (
    SLOW_DELETES,
    env_for,
    events,
    history_rows,
    our_backends,
    prom_values,
    remaining_ids,
    run_cli,
    seed_due_and_live,
    seed_operator_data,
    start_cli,
    statement_running,
    wait_until,
)


def test_sigterm_mid_batched_run_keeps_whole_batches_and_exits_143(postgres):
    due, live = seed_due_and_live(postgres, due=30)
    process = start_cli("refresh-tokens", "--batch-size", "2", "--sleep-ms", "150", "--json", env=env_for(postgres))
    wait_until(lambda: len(remaining_ids(postgres) & due) <= 26, what="two batches")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 128 + signal.SIGTERM
    result = json.loads(out)
    assert result["status"] == "interrupted"
    interrupted = [e for e in events(err) if e["event"] == "interrupted"]
    assert interrupted and interrupted[0]["rows"] == result["rows"]
    left = remaining_ids(postgres) & due
    assert len(left) == 30 - result["rows"] and result["rows"] % 2 == 0  # whole batches only
    rerun = run_cli("refresh-tokens", "--batch-size", "2", env=env_for(postgres))
    assert rerun.returncode == 0
    assert remaining_ids(postgres) == live


def test_sigterm_during_single_transaction_rolls_back(postgres):
    """SIGTERM mid-statement (a statement that would take ten seconds): psycopg cancels it
    on the server, the transaction rolls back, nothing is deleted."""
    due, live = seed_due_and_live(postgres, due=10)
    postgres.execute(SLOW_DELETES)
    process = start_cli("refresh-tokens", "--single-transaction", "--json", env=env_for(postgres))
    wait_until(lambda: statement_running(postgres), what="the DELETE to run")
    process.send_signal(signal.SIGTERM)
    out, _err = process.communicate(timeout=30)
    # Cancelled on the server, not left to run its ten seconds: nothing of ours runs on.
    assert not statement_running(postgres)
    assert process.returncode == 143
    assert json.loads(out)["status"] == "interrupted"
    assert remaining_ids(postgres) == due | live


def test_kill_9_in_single_transaction_mode_deletes_nothing(postgres):
    due, live = seed_due_and_live(postgres, due=10)
    postgres.execute(SLOW_DELETES)
    process = start_cli("refresh-tokens", "--single-transaction", env=env_for(postgres))
    wait_until(lambda: statement_running(postgres), what="the DELETE to run")
    process.kill()
    process.communicate(timeout=10)
    # The orphaned server backend notices its client is gone, and rolls back.
    wait_until(lambda: our_backends(postgres) == 0, what="the orphaned backend to go")
    assert remaining_ids(postgres) == due | live
    postgres.execute('DROP TRIGGER slow_delete ON "RefreshToken"')
    rerun = run_cli("refresh-tokens", "--json", env=env_for(postgres))
    assert (rerun.returncode, json.loads(rerun.stdout)["rows"]) == (0, 10)
    assert remaining_ids(postgres) == live


def test_kill_9_mid_batched_run_then_rerun(postgres):
    due, live = seed_due_and_live(postgres, due=30)
    process = start_cli("refresh-tokens", "--batch-size", "3", "--sleep-ms", "100", env=env_for(postgres))
    wait_until(lambda: len(remaining_ids(postgres) & due) <= 24, what="two batches")
    process.kill()
    process.communicate(timeout=10)
    left = remaining_ids(postgres) & due
    assert len(left) % 3 == 0 and 0 < len(left) < 30  # whole batches only
    assert remaining_ids(postgres) - due == live
    # The lock died with the connection: the rerun is not told another run holds it.
    rerun = run_cli("refresh-tokens", "--batch-size", "3", "--json", env=env_for(postgres))
    assert (rerun.returncode, json.loads(rerun.stdout)["rows"]) == (0, len(left)), rerun.stderr
    assert remaining_ids(postgres) == live


@pytest.mark.parametrize("phase", ["start", "end"])
def test_sigterm_while_a_ping_hangs_cuts_it_short_and_exits_with_the_recorded_code(sqlite, tmp_path, monitor, phase):
    """Before the work (the start ping), the run is interrupted: 143, recorded as such.
    After it (the end ping), the record is written first and holds the run's outcome: the
    process exits with that code, so cron and the history never disagree."""
    seed_operator_data(sqlite)
    monitor.hang = (lambda path: "/start" in path) if phase == "start" else (lambda path: "/start" not in path)
    process = start_cli(
        "refresh-tokens",
        "--json",
        env={
            "DATABASE_URL": sqlite.url,
            "SKYBOT_CLEANUP_PING_URL": f"http://127.0.0.1:{monitor.server_port}/{{task}}",
            "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path),
            # Waiting for the ping would take a minute: communicate()'s timeout would fail the test.
            "SKYBOT_CLEANUP_PING_TIMEOUT_S": "60",
        },
    )
    wait_until(lambda: any(monitor.hang(path) for _, path, _ in monitor.requests), what=f"the {phase} ping")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == (143 if phase == "start" else 0), stderr
    assert events(stderr, "ping_failed") == []  # it did not wait for the ping to fail
    assert all(line.startswith("{") for line in stderr.splitlines())  # no traceback
    (row,) = history_rows(sqlite)
    values = prom_values(tmp_path / "skybot_cleanup_refresh-tokens.prom")
    if phase == "start":  # nothing was deleted: the run was interrupted before its work
        assert (row["status"], row["exit_code"], row["rows"]) == ("interrupted", 143, 0)
        assert json.loads(stdout)["status"] == "interrupted"
        assert values["skybot_cleanup_last_exit_code"] == 143
        assert sqlite.ids("RefreshToken") >= {"expired_3h", "expired_1h"}
    else:  # the work was done and recorded: the run's outcome stays true, and the process's
        assert (row["status"], row["exit_code"], row["rows"]) == ("ok", 0, 2)
        assert json.loads(stdout)["exit_code"] == 0
        assert values["skybot_cleanup_last_exit_code"] == 0
        assert "expired_3h" not in sqlite.ids("RefreshToken")


def test_sigterm_during_all_stops_it_there(postgres):
    """`all` ends with the task it was running: the tasks after it do not start."""
    seed_operator_data(postgres)
    postgres.execute(SLOW_DELETES)  # refresh-tokens, the second task, parks on its first row
    process = start_cli("all", "--json", env=env_for(postgres))
    wait_until(lambda: statement_running(postgres), what="refresh-tokens deleting")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert [(json.loads(line)["task"], json.loads(line)["status"]) for line in out.splitlines()] == [
        ("idempotency-keys", "ok"),
        ("refresh-tokens", "interrupted"),
    ]
    assert [(row["task"], row["status"]) for row in history_rows(postgres)] == [
        ("idempotency-keys", "ok"),
        ("refresh-tokens", "interrupted"),
    ]
    assert postgres.ids("MagicLink") == {"ml_live", "ml_used", "ml_expired"}  # magic-links never ran
