"""The run lock: one run per task at a time, held across batches, never left behind."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import sqlalchemy as sa
from helpers import (
    APP_NAME,
    GATED_DELETES,
    SLOW_DELETES,
    advisory_lock_held,
    advisory_lock_sql,
    closed_delete_gate,
    env_for,
    events,
    remaining_ids,
    run_cli,
    scalar,
    seed_due_and_live,
    seed_tokens,
    start_cli,
    statement_running,
    wait_until,
)


@pytest.mark.parametrize("mode", [["--batch-size", "3"], ["--single-transaction"]], ids=["batches", "single"])
def test_two_concurrent_runs_delete_each_row_once(postgres, mode):
    """The first run is in the middle of a statement, its lock taken; the second arrives
    meanwhile and skips. No timing window: the first run's DELETE waits at a gate the test
    opens only once the second run has ended, however long either takes to start."""
    _due, live = seed_due_and_live(postgres, due=4)
    postgres.execute(GATED_DELETES)
    env = env_for(postgres)
    with closed_delete_gate(postgres):
        first = start_cli("refresh-tokens", *mode, "--json", env=env)
        wait_until(lambda: statement_running(postgres), what="the first run's DELETE")
        second = run_cli("refresh-tokens", *mode, "--json", env=env)
    out, err = first.communicate(timeout=60)
    assert (second.returncode, json.loads(second.stdout)["status"], json.loads(second.stdout)["rows"]) == (
        75,
        "skipped",
        0,
    )
    assert (first.returncode, json.loads(out)["rows"]) == (0, 4), err
    assert remaining_ids(postgres) == live


def test_a_frozen_run_loses_its_lock_within_the_idle_timeout(postgres):
    """SIGSTOP (a paused container, a frozen VM): the server ends the idle transaction
    after SKYBOT_CLEANUP_IDLE_TIMEOUT_S and the next run proceeds."""
    _due, live = seed_due_and_live(postgres, due=10)
    frozen = start_cli(
        "refresh-tokens", "--batch-size", "1", "--sleep-ms", "300", env=env_for(postgres, idle_timeout_s=2)
    )
    try:
        wait_until(lambda: len(remaining_ids(postgres) - live) <= 8, what="two batches")
        frozen.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        wait_until(lambda: not advisory_lock_held(postgres), timeout=10, what="the server to free the lock")
        assert time.monotonic() - stopped < 4
        rerun = run_cli("refresh-tokens", "--batch-size", "5", "--json", env=env_for(postgres))
        assert rerun.returncode == 0, rerun.stderr
        assert remaining_ids(postgres) == live
    finally:
        frozen.kill()
        frozen.communicate(timeout=10)


def test_no_batch_is_deleted_once_the_lock_is_lost(postgres):
    """Kill the run's connection while another session takes the task's lock: the
    run's retry finds the lock taken and stops (75); not one more row goes."""
    due, _live = seed_due_and_live(postgres, due=20)
    process = start_cli(
        "refresh-tokens", "--batch-size", "2", "--sleep-ms", "200", "--json", env=env_for(postgres, max_retries=2)
    )
    wait_until(lambda: len(remaining_ids(postgres) & due) <= 16, what="two batches")
    with postgres.engine.connect() as other:
        other.exec_driver_sql("BEGIN")
        scalar(
            postgres,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = :app AND datname = current_database()",
            app=APP_NAME,
        )
        other.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtextextended('skybot-cleanup:refresh-tokens', 0))")
        left_when_lost = remaining_ids(postgres) & due
        out, err = process.communicate(timeout=60)
        assert remaining_ids(postgres) & due == left_when_lost
        other.exec_driver_sql("ROLLBACK")
    assert process.returncode == 75, err
    assert json.loads(out)["status"] == "skipped"


def test_the_lock_holds_between_batches_against_a_competitor_polling_for_it(postgres):
    """Another session tries the task's lock without pause for the whole run (the hourly
    job firing during a manual drain, many times over): it never gets it, and the run
    ends ok with every row."""
    due, live = seed_due_and_live(postgres, due=400)
    stop = threading.Event()
    attempts: list[bool] = []
    due_left_when_won: list[int] = []

    def competitor() -> None:
        engine = sa.create_engine(postgres.engine.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            while not stop.is_set():
                got = conn.scalar(
                    sa.text("SELECT pg_try_advisory_xact_lock(hashtextextended('skybot-cleanup:refresh-tokens', 0))")
                )
                attempts.append(bool(got))
                if got:
                    # The run unlocks in the message that commits its last batch: whoever
                    # gets the lock must find every due row gone, or it won mid-run.
                    left = conn.scalar(sa.text("""SELECT count(*) FROM "RefreshToken" WHERE left(id, 4) = 'due_'"""))
                    due_left_when_won.append(int(left or 0))
        engine.dispose()

    process = start_cli("refresh-tokens", "--batch-size", "1", "--json", env=env_for(postgres))
    wait_until(lambda: len(remaining_ids(postgres) & due) < 390, what="the first batches")
    thread = threading.Thread(target=competitor)
    thread.start()
    try:
        out, err = process.communicate(timeout=120)
    finally:
        stop.set()
        thread.join()
    assert process.returncode == 0, err
    result = json.loads(out)
    assert (result["status"], result["rows"], result["remaining"]) == ("ok", 400, 0)
    assert len(attempts) > 100  # it tried hard
    assert set(due_left_when_won) <= {0}  # and never won while the run ran
    assert remaining_ids(postgres) == live
    assert not advisory_lock_held(postgres)


def test_no_lock_is_left_after_any_kind_of_run(postgres):
    seed_due_and_live(postgres, due=5)
    for args, code in (
        (["--batch-size", "2"], 0),
        ([], 0),
        (["--batch-size", "2"], 2),
    ):  # the last with a missing column: fails inside its first transaction
        env = env_for(postgres)
        if code == 2:
            env["SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN"] = "nope"
        completed = run_cli("refresh-tokens", *args, env=env)
        assert completed.returncode == code, completed.stderr
        assert not advisory_lock_held(postgres)


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
    (skip,) = [event for event in events(skipped.stderr) if event["event"] == "run_skipped"]
    assert skip["error"] == "another refresh-tokens run holds the lock; skipped"
    assert mapped.returncode == 0, mapped.stderr
    assert other_task.returncode == 0, other_task.stderr
    assert postgres.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}


def test_a_killed_run_frees_its_lock_within_seconds_even_mid_statement(postgres):
    """kill -9 during a batch that would run a minute: the server notices the client is
    gone (client_connection_check_interval) and ends the statement, and the lock with it,
    long before the statement would have ended."""
    seed_due_and_live(postgres, due=60)
    postgres.execute(SLOW_DELETES)
    run = start_cli("refresh-tokens", "--batch-size", "100", env=env_for(postgres, statement_timeout_ms=0))
    wait_until(lambda: statement_running(postgres), what="the slow batch to start")
    assert advisory_lock_held(postgres)
    run.kill()
    run.communicate(timeout=30)
    # Without the check, the lock stays for the rest of the minute.
    wait_until(lambda: not advisory_lock_held(postgres), timeout=30, what="the server to end the orphaned statement")
    assert len(postgres.ids("RefreshToken")) == 65  # the batch rolled back whole
