"""Through a real PgBouncer in transaction mode: small pools, prepared statements, locks."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from components import start_pgbouncer
from helpers import (
    SLOW_DELETES,
    advisory_lock_held,
    events,
    history_rows,
    run_cli,
    seed_due_and_live,
    seed_tokens_and_keys,
    sqlalchemy_url,
    start_cli,
    statement_running,
    wait_until,
)

pgbouncer_group = pytest.mark.xdist_group("pgbouncer")


@pytest.fixture(scope="module", params=[1, 2], ids=lambda size: f"pool{size}")
def pgbouncer(request, pg_server_url):
    bouncer = start_pgbouncer(pg_server_url, pool_size=request.param)
    bouncer.pool_size = request.param
    yield bouncer
    bouncer.stop()


@pgbouncer_group
def test_repeated_batched_runs_leave_no_prepared_statement_on_the_pooled_connection(postgres, pgbouncer):
    """psycopg would prepare after 5 executions; under transaction pooling the next
    client would then fail with "prepared statement _pg3_0 already exists"."""
    for query in ({}, {"pgbouncer": "true"}):
        for _ in range(3):
            seed_tokens_and_keys(postgres, due=8)
            url = pgbouncer.url(postgres.database, **query)
            completed = run_cli("refresh-tokens", "--batch-size", "1", "--json", env={"DATABASE_URL": url})
            assert completed.returncode == 0, completed.stderr
            assert json.loads(completed.stdout)["rows"] == 8
            postgres.execute('DELETE FROM "RefreshToken"; DELETE FROM "IdempotencyKey"')
    engine = sa.create_engine(
        sqlalchemy_url(pgbouncer.url(postgres.database)),
        poolclass=sa.pool.NullPool,
        connect_args={"prepare_threshold": None},
    )
    try:
        with engine.connect() as conn:
            # Through the pool, so on (one of) the very server connections the runs used.
            assert conn.scalar(sa.text("SELECT count(*) FROM pg_prepared_statements")) == 0
    finally:
        engine.dispose()


@pgbouncer_group
def test_two_batched_tasks_started_together_both_finish_through_a_small_pool(postgres, pgbouncer):
    """A run holds one server connection, never two: with a pool of 1 the second task
    queues behind the first; with 2 they run side by side. No deadlock either way."""
    seed_tokens_and_keys(postgres, due=20)
    env = {"DATABASE_URL": pgbouncer.url(postgres.database), "SKYBOT_CLEANUP_RETRY_DELAY_MS": "200"}
    runs = [
        start_cli(task, "--batch-size", "2", "--sleep-ms", "20", "--json", env=env)
        for task in ("idempotency-keys", "refresh-tokens")
    ]
    results = [run.communicate(timeout=60) for run in runs]
    for run, (out, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err
        assert json.loads(out)["rows"] == 20
    assert postgres.ids("RefreshToken") == {"live"} and postgres.ids("IdempotencyKey") == {"ik_live"}


@pgbouncer_group
def test_a_row_the_app_holds_is_stepped_around_through_pgbouncer(postgres, pgbouncer):
    seed_tokens_and_keys(postgres, due=15)
    with postgres.engine.connect() as app_conn:  # the app, directly
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'due_007' FOR UPDATE""")
        completed = run_cli(
            "refresh-tokens",
            "--batch-size",
            "4",
            "--json",
            env={"DATABASE_URL": pgbouncer.url(postgres.database), "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "200"},
        )
        app_conn.rollback()
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["rows"], result["remaining"]) == (0, 14, 1), completed.stderr
    assert postgres.ids("RefreshToken") == {"live", "due_007"}


@pgbouncer_group
def test_no_lock_is_left_on_a_pooled_server_connection(postgres, pgbouncer):
    """The run's session lock is released in the same message as its last COMMIT or
    ROLLBACK, so the server connection PgBouncer hands to the next client holds none,
    whether the run succeeded, failed inside its transaction, or was skipped."""
    seed_tokens_and_keys(postgres, due=6)
    url = pgbouncer.url(postgres.database)
    outcomes = [
        run_cli("refresh-tokens", "--batch-size", "2", env={"DATABASE_URL": url}).returncode,
        run_cli(
            "refresh-tokens", env={"DATABASE_URL": url, "SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN": "nope"}
        ).returncode,
    ]
    with postgres.engine.connect() as holder:
        holder.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtextextended('skybot-cleanup:refresh-tokens', 0))")
        outcomes.append(run_cli("refresh-tokens", env={"DATABASE_URL": url}).returncode)
        holder.rollback()
    assert outcomes == [0, 2, 75]
    with postgres.engine.connect() as conn:
        held = conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        )
    assert held == 0
    again = run_cli("idempotency-keys", "--batch-size", "2", env={"DATABASE_URL": url})
    assert again.returncode == 0, again.stderr


@pgbouncer_group
def test_a_killed_run_frees_its_lock_within_seconds_through_pgbouncer(postgres, pgbouncer):
    """The client vanishes from PgBouncer mid-statement: PgBouncer drops the server
    connection, and the server notices within the check interval."""
    seed_due_and_live(postgres, due=60)
    postgres.execute(SLOW_DELETES)
    env = {"DATABASE_URL": pgbouncer.url(postgres.database), "SKYBOT_CLEANUP_STATEMENT_TIMEOUT_MS": "0"}
    run = start_cli("refresh-tokens", "--batch-size", "100", env=env)
    wait_until(lambda: statement_running(postgres), what="the slow batch to start")
    run.kill()
    run.communicate(timeout=30)
    wait_until(lambda: not advisory_lock_held(postgres), timeout=30, what="the server to end the orphaned statement")
    assert len(postgres.ids("RefreshToken")) == 65


@pgbouncer_group
def test_pipelined_history_writes_and_report_reads_go_through_pgbouncer(postgres, pgbouncer):
    """A run's history row is one pipelined transaction, and a report's reads one pipeline
    in its transaction: through transaction pooling, both land, and nothing is spooled."""
    seed_tokens_and_keys(postgres, due=8)
    url = pgbouncer.url(postgres.database)
    for command in (("refresh-tokens", "--batch-size", "3"), ("metrics",), ("idempotency-keys",)):
        completed = run_cli(*command, "--json", env={"DATABASE_URL": url})
        assert completed.returncode == 0, completed.stderr
        assert "history_unavailable" not in [event["event"] for event in events(completed.stderr)]
    recorded = [(row["task"], row["status"]) for row in history_rows(postgres)]
    assert recorded == [("refresh-tokens", "ok"), ("metrics", "ok"), ("idempotency-keys", "ok")]
    status = run_cli("status", "--json", env={"DATABASE_URL": url})
    jobs = {job["task"]: job for job in map(json.loads, status.stdout.splitlines())}
    assert (jobs["refresh-tokens"]["health"], jobs["refresh-tokens"]["due_rows"]) == ("OK", 0)
    assert run_cli("check", "--json", env={"DATABASE_URL": url}).returncode == 0
