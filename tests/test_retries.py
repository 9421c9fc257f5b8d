"""Retries: transient failures are retried with backoff, and a retry redoes what did not commit."""

from __future__ import annotations

import json

import pytest
from helpers import APP_NAME, env_for, events, remaining_ids, run_cli, scalar, seed_due_and_live, start_cli, wait_until


def test_a_migrations_table_lock_is_bounded_by_lock_timeout_then_retried(postgres):
    seed_due_and_live(postgres, due=5)
    with postgres.engine.connect() as migration:
        migration.exec_driver_sql('BEGIN; LOCK TABLE "RefreshToken" IN ACCESS EXCLUSIVE MODE')
        completed = run_cli(
            "refresh-tokens",
            "--batch-size",
            "2",
            "--no-history",
            env=env_for(postgres, lock_timeout_ms=200, max_retries=1, retry_delay_ms=10),
        )
        migration.exec_driver_sql("ROLLBACK")
    assert completed.returncode == 1, completed.stderr
    # Bounded by lock_timeout, then retried once: the mechanism, not a wall-clock bound.
    assert [e["error_class"] for e in events(completed.stderr) if e["event"] == "retrying"] == ["LockNotAvailable"]
    assert "lock timeout" in events(completed.stderr, "run_failed")[0]["error"]


def test_terminated_backend_is_retried_and_the_run_completes(postgres):
    due, live = seed_due_and_live(postgres, due=20)
    process = start_cli("refresh-tokens", "--batch-size", "2", "--sleep-ms", "100", "--json", env=env_for(postgres))
    wait_until(lambda: len(remaining_ids(postgres) & due) <= 16, what="two batches")
    terminated = scalar(
        postgres,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = :app AND datname = current_database()",
        app=APP_NAME,
    )
    assert terminated >= 1
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert json.loads(out)["rows"] == 20
    retries = [e for e in events(err) if e["event"] == "retrying"]
    assert retries and retries[0]["error_class"] in {"AdminShutdown", "OperationalError"}
    assert remaining_ids(postgres) == live


def test_app_retry_settings_are_honoured(postgres):
    """JOB_MAX_RETRIES and JOB_RETRY_DELAY, the app's own: a migration's table lock makes
    every attempt time out."""
    seed_due_and_live(postgres, due=1)
    with postgres.engine.connect() as migration:
        migration.exec_driver_sql('BEGIN; LOCK TABLE "RefreshToken" IN ACCESS EXCLUSIVE MODE')
        completed = run_cli(
            "refresh-tokens",
            env={
                "DATABASE_URL": postgres.url,
                "JOB_MAX_RETRIES": "1",
                "JOB_RETRY_DELAY": "10",
                "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "50",
            },
        )
        migration.exec_driver_sql("ROLLBACK")
    retries = [e for e in events(completed.stderr) if e["event"] == "retrying"]
    assert (completed.returncode, len(retries)) == (1, 1)
    assert [e["error_class"] for e in retries] == ["LockNotAvailable"]
    assert 0.01 <= retries[0]["delay_s"] <= 0.02  # 10 ms, plus up to 10 ms of jitter
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert failed["error"] == "canceling statement due to lock timeout"


FAIL_AT_COMMIT = """
CREATE SEQUENCE fail_at;
CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Sequences ignore rollbacks: exactly one commit fails, the one that reaches row {row}.
    -- Qualified: the tool's transactions pin search_path to pg_catalog.
    IF nextval('public.fail_at') = {row} THEN
        RAISE EXCEPTION 'injected failure at commit' USING ERRCODE = '40001';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER fail_at_commit AFTER DELETE ON "RefreshToken"
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_at_commit();
"""


@pytest.mark.parametrize("failing_row", [1, 11, 21], ids=["first batch", "middle batch", "last batch"])
def test_a_batch_whose_commit_fails_is_redone_by_the_retry(postgres, failing_row):
    """The commit of one batch fails (a serialization failure at COMMIT): the retry
    must redo that batch, not walk past it as if it had been deleted."""
    _due, live = seed_due_and_live(postgres, due=30)
    postgres.execute(FAIL_AT_COMMIT.format(row=failing_row))
    completed = run_cli("refresh-tokens", "--batch-size", "10", "--json", env=env_for(postgres))
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert (result["rows"], result["remaining"]) == (30, 0)
    assert [e["error_class"] for e in events(completed.stderr) if e["event"] == "retrying"] == ["SerializationFailure"]
    assert remaining_ids(postgres) == live
