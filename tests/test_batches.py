"""Batched runs, caps, locks, timeouts, retries and signals, against a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import CONSOLE_SCRIPT, run_cli

from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import insert_rows, refresh_token_row
from skybot_cleanup.history import history_tables

HOUR = timedelta(hours=1)
APP_NAME = "skybot-cleanup:refresh-tokens"


def seed_due_and_live(backend, due: int, live: int = 5) -> tuple[set[str], set[str]]:
    now = utc_now()
    due_rows = [refresh_token_row(f"due_{i:04d}", now - HOUR - i * timedelta(seconds=1)) for i in range(due)]
    live_rows = [refresh_token_row(f"live_{i:04d}", now + HOUR) for i in range(live)]
    backend.insert("RefreshToken", due_rows + live_rows)
    return {r["id"] for r in due_rows}, {r["id"] for r in live_rows}


def env_for(backend, **settings: object) -> dict[str, str]:
    env = {"DATABASE_URL": backend.url, "SKYBOT_CLEANUP_RETRY_DELAY_MS": "50"}
    env.update({f"SKYBOT_CLEANUP_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    base = {"PATH": "/usr/bin:/bin", "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"]}  # never the real ~/.local/state
    return subprocess.Popen(
        [str(CONSOLE_SCRIPT), *args],
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def wait_until(condition, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def remaining_ids(backend) -> set[str]:
    return backend.ids("RefreshToken")


def scalar(backend, sql: str, **params: object):
    with backend.engine.connect() as conn:
        return conn.scalar(sa.text(sql), params)


def advisory_lock_held(backend) -> bool:
    return bool(
        scalar(
            backend,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
    )


def our_backends(backend) -> int:
    return int(
        scalar(
            backend,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app AND datname = current_database()",
            app=APP_NAME,
        )
    )


def backend_waiting(backend) -> bool:
    return bool(
        scalar(
            backend,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app"
            " AND wait_event_type = 'Lock' AND datname = current_database()",
            app=APP_NAME,
        )
    )


def test_batched_run_reports_batches_and_remaining(postgres):
    _due, live = seed_due_and_live(postgres, due=25)
    completed = run_cli("refresh-tokens", "--batch-size", "10", "--json", env=env_for(postgres))
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert (result["rows"], result["batches"], result["remaining"]) == (25, 3, 0)
    assert result["longest_batch_ms"] >= 0
    assert remaining_ids(postgres) == live


def test_max_rows_stops_and_the_next_run_continues(postgres):
    due, live = seed_due_and_live(postgres, due=25)
    first = run_cli("refresh-tokens", "--batch-size", "4", "--max-rows", "10", "--json", env=env_for(postgres))
    result = json.loads(first.stdout)
    assert (first.returncode, result["rows"], result["remaining"], result["stopped_by"]) == (0, 10, 15, "max_rows")
    # Oldest first: the ten that expired longest ago are gone.
    oldest_ten = set(sorted(due)[-10:])
    assert remaining_ids(postgres) == (due - oldest_ten) | live
    second = run_cli("refresh-tokens", "--max-rows", "100", "--json", env=env_for(postgres))
    assert (json.loads(second.stdout)["rows"], json.loads(second.stdout)["remaining"]) == (15, 0)
    assert remaining_ids(postgres) == live


def test_max_runtime_stops_between_batches(postgres):
    due, live = seed_due_and_live(postgres, due=20)
    completed = run_cli(
        "refresh-tokens",
        "--batch-size",
        "1",
        "--sleep-ms",
        "100",
        "--max-runtime",
        "0.5",
        "--json",
        env=env_for(postgres),
    )
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["stopped_by"]) == (0, "max_runtime")
    assert 1 <= result["rows"] < 20
    assert result["rows"] + result["remaining"] == 20
    assert len(remaining_ids(postgres) & due) == result["remaining"]
    again = run_cli("refresh-tokens", "--batch-size", "100", "--json", env=env_for(postgres))
    assert json.loads(again.stdout)["rows"] == result["remaining"]
    assert remaining_ids(postgres) == live


def test_concurrent_writer_keeps_its_live_rows_and_held_rows_are_skipped(postgres):
    _due, live = seed_due_and_live(postgres, due=300)
    stop = threading.Event()
    written: list[str] = []

    def app_writer() -> None:
        engine = sa.create_engine(postgres.engine.url, poolclass=sa.pool.NullPool)
        i = 0
        while not stop.is_set():
            with engine.begin() as conn:
                insert_rows(
                    conn, postgres.metadata, {"RefreshToken": [refresh_token_row(f"new_{i}", utc_now() + HOUR)]}
                )
                # Extend a live token's expiry, as a refresh would.
                conn.exec_driver_sql("""UPDATE "RefreshToken" SET "expiresAt" = "expiresAt" + interval '1 hour'
                                        WHERE id = 'live_0000'""")
            written.append(f"new_{i}")
            i += 1
        engine.dispose()

    writer = threading.Thread(target=app_writer)
    with postgres.engine.connect() as app_conn:
        # The app holds one due row mid-transaction: the run must step around it, not wait.
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'due_0150' FOR UPDATE""")
        writer.start()
        try:
            completed = run_cli(
                "refresh-tokens",
                "--batch-size",
                "7",
                "--sleep-ms",
                "5",
                "--json",
                env=env_for(postgres, lock_timeout_ms=300),
            )
        finally:
            stop.set()
            writer.join()
        app_conn.rollback()
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["rows"], result["remaining"]) == (0, 299, 1), completed.stderr
    assert written, "the writer never wrote"
    assert remaining_ids(postgres) == live | set(written) | {"due_0150"}
    assert "batch_met_held_rows" in [event["event"] for event in events(completed.stderr)]


def test_two_concurrent_batched_runs_delete_each_row_once(postgres):
    """The first run waits on a row the app holds, its lock taken; the second arrives
    meanwhile. No timing window: the app's row lock decides when the first goes on."""
    _due, live = seed_due_and_live(postgres, due=8)
    env = env_for(postgres, lock_timeout_ms=0)
    with postgres.engine.connect() as app_conn:
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'due_0003' FOR UPDATE""")
        first = start_cli("refresh-tokens", "--batch-size", "3", "--json", env=env)
        wait_until(lambda: backend_waiting(postgres), what="the first run to wait on the app's row")
        second = run_cli("refresh-tokens", "--batch-size", "3", "--json", env=env)
        app_conn.rollback()
    out, err = first.communicate(timeout=60)
    assert (second.returncode, json.loads(second.stdout)["rows"]) == (75, 0)
    assert (first.returncode, json.loads(out)["rows"]) == (0, 8), err
    assert remaining_ids(postgres) == live


def test_a_least_privilege_role_runs_batches(postgres, pg_admin):
    """SELECT and DELETE only, as the README asks: batches take no row locks of their own."""
    _due, live = seed_due_and_live(postgres, due=30)
    role = f"skybot_lp_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
    try:
        postgres.execute(f'GRANT SELECT, DELETE ON "RefreshToken" TO "{role}"')
        url = sa.make_url(postgres.url).set(username=role).render_as_string(hide_password=False)
        completed = run_cli("refresh-tokens", "--batch-size", "7", "--json", "--no-history", env={"DATABASE_URL": url})
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout)["rows"] == 30
        assert remaining_ids(postgres) == live
    finally:
        postgres.execute(f'DROP OWNED BY "{role}"')
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP ROLE "{role}"')


def test_one_server_connection_and_no_snapshot_held_while_idle_between_batches(postgres):
    _due, live = seed_due_and_live(postgres, due=6)
    process = start_cli("refresh-tokens", "--batch-size", "1", "--sleep-ms", "400", "--json", env=env_for(postgres))
    try:
        wait_until(lambda: len(remaining_ids(postgres) - live) <= 4, what="two batches")
        rows = []
        for _ in range(5):
            with postgres.engine.connect() as conn:
                rows += conn.execute(
                    sa.text(
                        "SELECT state, backend_xmin FROM pg_stat_activity WHERE application_name = :app"
                        " AND datname = current_database()"
                    ),
                    {"app": APP_NAME},
                ).all()
            time.sleep(0.1)
    finally:
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    idle = [row for row in rows if row.state == "idle in transaction"]
    assert idle, rows  # it sleeps inside its locked transaction...
    assert all(row.backend_xmin is None for row in idle), idle  # ...without pinning the vacuum horizon
    assert len(rows) <= 5  # one backend per sample, never two


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


def test_a_migrations_table_lock_is_bounded_by_lock_timeout_then_retried(postgres):
    seed_due_and_live(postgres, due=5)
    with postgres.engine.connect() as migration:
        migration.exec_driver_sql('BEGIN; LOCK TABLE "RefreshToken" IN ACCESS EXCLUSIVE MODE')
        started = time.monotonic()
        completed = run_cli(
            "refresh-tokens",
            "--batch-size",
            "2",
            "--no-history",
            env=env_for(postgres, lock_timeout_ms=200, max_retries=1, retry_delay_ms=10),
        )
        elapsed = time.monotonic() - started
        migration.exec_driver_sql("ROLLBACK")
    assert completed.returncode == 1, completed.stderr
    assert [e["error_class"] for e in events(completed.stderr) if e["event"] == "retrying"] == ["LockNotAvailable"]
    assert elapsed < 5


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
    due, live = seed_due_and_live(postgres, due=10)
    with postgres.engine.connect() as app_conn:
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'due_0005' FOR UPDATE""")
        process = start_cli("refresh-tokens", "--json", env=env_for(postgres, lock_timeout_ms=0))
        wait_until(lambda: backend_waiting(postgres), what="the DELETE to wait on the app's row")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, _err = process.communicate(timeout=10)
        elapsed = time.monotonic() - started
        # psycopg cancelled the statement on the server: nothing of ours is left running.
        assert not backend_waiting(postgres)
        app_conn.rollback()
    assert process.returncode == 143 and elapsed < 5
    assert json.loads(out)["status"] == "interrupted"
    assert remaining_ids(postgres) == due | live


def test_kill_9_in_single_transaction_mode_deletes_nothing(postgres):
    due, live = seed_due_and_live(postgres, due=10)
    with postgres.engine.connect() as app_conn:
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'due_0005' FOR UPDATE""")
        process = start_cli("refresh-tokens", env=env_for(postgres, lock_timeout_ms=0))
        wait_until(lambda: backend_waiting(postgres), what="the DELETE to wait")
        process.kill()
        process.communicate(timeout=10)
        app_conn.rollback()
    # The orphaned server backend finishes its statement, finds no client and rolls back.
    wait_until(lambda: our_backends(postgres) == 0, what="the orphaned backend to go")
    assert remaining_ids(postgres) == due | live
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


def test_lock_timeout_on_a_held_row_is_retried_then_reported(postgres):
    due, live = seed_due_and_live(postgres, due=3)
    with postgres.engine.connect() as app_conn:
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'due_0001' FOR UPDATE""")
        completed = run_cli("refresh-tokens", env=env_for(postgres, lock_timeout_ms=100, max_retries=2))
        app_conn.rollback()
    assert completed.returncode == 1
    retries = [e for e in events(completed.stderr) if e["event"] == "retrying"]
    assert [e["error_class"] for e in retries] == ["LockNotAvailable", "LockNotAvailable"]
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert failed["error"] == "canceling statement due to lock timeout"
    assert remaining_ids(postgres) == due | live


def test_app_retry_settings_are_honoured(postgres):
    seed_due_and_live(postgres, due=1)
    with postgres.engine.connect() as app_conn:
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'due_0000' FOR UPDATE""")
        completed = run_cli(
            "refresh-tokens",
            env={
                "DATABASE_URL": postgres.url,
                "JOB_MAX_RETRIES": "1",
                "JOB_RETRY_DELAY": "10",
                "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "50",
            },
        )
        app_conn.rollback()
    retries = [e for e in events(completed.stderr) if e["event"] == "retrying"]
    assert (completed.returncode, len(retries)) == (1, 1)
    assert 0.01 <= retries[0]["delay_s"] <= 0.02  # 10 ms, plus up to 10 ms of jitter


def test_a_read_only_database_is_one_line_and_exit_2(postgres):
    seed_due_and_live(postgres, due=2)
    postgres.execute(f'ALTER DATABASE "{postgres.database}" SET default_transaction_read_only = on')
    completed = run_cli("refresh-tokens", "--batch-size", "5", env=env_for(postgres))
    assert completed.returncode == 2, completed.stderr
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert failed["error"].startswith("the database is read-only (a hot standby, or default_transaction_read_only")
    assert "retrying" not in [e["event"] for e in events(completed.stderr)]
    # A dry run only reads: it works.
    assert run_cli("refresh-tokens", "--dry-run", env=env_for(postgres)).returncode == 0


def test_tasks_started_together_on_a_fresh_database_all_reach_the_history(postgres):
    """The first runs create the history tables: serialised, not racing in the catalog."""
    seed_due_and_live(postgres, due=3)
    names = ["idempotency-keys", "refresh-tokens", "magic-links", "revoked-tokens"]
    processes = [start_cli(name, env=env_for(postgres)) for name in names]
    for process in processes:
        _out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "history_unavailable" not in err
    runs = history_tables("postgresql", "skybot_cleanup").runs
    with postgres.engine.connect() as conn:
        assert sorted(conn.scalars(sa.select(runs.c.task))) == sorted(names)


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--max-rows", "-1"], ["--sleep-ms", "x"]])
def test_invalid_batch_options_are_usage_errors(args):
    completed = run_cli("refresh-tokens", *args, env={"DATABASE_URL": "sqlite:///x.db"})
    assert completed.returncode == 2
    assert "Invalid value" in completed.stderr and "Traceback" not in completed.stderr


def test_dry_run_in_batched_mode_reports_the_exact_total(postgres):
    due, live = seed_due_and_live(postgres, due=12)
    completed = run_cli("refresh-tokens", "--batch-size", "5", "--dry-run", "--json", env=env_for(postgres))
    assert json.loads(completed.stdout)["rows"] == 12
    assert remaining_ids(postgres) == due | live


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


FAIL_AT_COMMIT = """
CREATE SEQUENCE fail_at;
CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Sequences ignore rollbacks: exactly one commit fails, the one that reaches row {row}.
    IF nextval('fail_at') = {row} THEN
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


def test_a_row_the_app_holds_inside_a_run_of_equal_values_is_the_only_one_left(postgres):
    now = utc_now()
    same = now - HOUR
    postgres.insert(
        "RefreshToken",
        [refresh_token_row(f"tie_{i:02d}", same) for i in range(30)] + [refresh_token_row("live", now + HOUR)],
    )
    with postgres.engine.connect() as app_conn:
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'tie_13' FOR UPDATE""")
        completed = run_cli("refresh-tokens", "--batch-size", "8", "--json", env=env_for(postgres, lock_timeout_ms=200))
        app_conn.rollback()
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["rows"], result["remaining"]) == (0, 29, 1), completed.stderr
    assert remaining_ids(postgres) == {"live", "tie_13"}


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
