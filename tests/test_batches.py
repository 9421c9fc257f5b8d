"""Batched runs: batch sizes, caps, held rows, and what a run leaves for the next."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from helpers import (
    APP_NAME,
    HOUR,
    env_for,
    events,
    remaining_ids,
    run_cli,
    seed_due_and_live,
    start_cli,
    wait_until,
)

from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import insert_rows, refresh_token_row


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
    # Exactly ten due rows gone (in heap order: these rows share a page), and nothing else.
    assert len(remaining_ids(postgres) & due) == 15 and live <= remaining_ids(postgres)
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
        "1000",
        # At most ~5 of the 20 batches fit, and the first fits however slow the machine's
        # start-up (the run's clock starts once the tool is imported).
        "--max-runtime",
        "5",
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
    # Stepped around, not waited for: no batch met the held row's lock.
    assert "batch_met_held_row" not in [event["event"] for event in events(completed.stderr)]


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
        sample = sa.text(
            "SELECT pid, state, state_change, backend_xmin FROM pg_stat_activity WHERE application_name = :app"
            " AND datname = current_database()"
        )
        rows, idle = [], []
        for _ in range(5):
            # A state and an xmin are read a moment apart: a backend that woke in between
            # shows an idle state with its new statement's xmin. An idle row counts only if
            # the next sample (its own transaction, so a fresh read) shows the same idle
            # period: the backend cannot have started a statement between the two.
            with postgres.engine.connect() as conn:
                first = conn.execute(sample, {"app": APP_NAME}).all()
            with postgres.engine.connect() as conn:
                second = conn.execute(sample, {"app": APP_NAME}).all()
            rows += first
            idle += [
                row
                for row in first
                for later in second
                if (row.pid, row.state, row.state_change) == (later.pid, "idle in transaction", later.state_change)
            ]
            time.sleep(0.1)
    finally:
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert idle, rows  # it sleeps inside its locked transaction...
    assert all(row.backend_xmin is None for row in idle), idle  # ...without pinning the vacuum horizon
    assert len(rows) <= 5  # one backend per sample, never two


def test_dry_run_in_batched_mode_reports_the_exact_total(postgres):
    due, live = seed_due_and_live(postgres, due=12)
    completed = run_cli("refresh-tokens", "--batch-size", "5", "--dry-run", "--json", env=env_for(postgres))
    assert json.loads(completed.stdout)["rows"] == 12
    assert remaining_ids(postgres) == due | live


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


@pytest.mark.parametrize("batch_size", ["10000", "7"], ids=["pages", "a page at a time"])
def test_thousands_of_held_rows_are_skipped_without_waiting_for_any(postgres, batch_size):
    """The app holds every fifth due row: each is left out by the server as its batch
    reaches it (its xmax names a running transaction), never waited for. The mechanism,
    not a stopwatch: no statement meets a held row's lock, and remaining is exact."""
    due, live = seed_due_and_live(postgres, due=5_000)
    with postgres.engine.connect() as app_conn:
        app_conn.exec_driver_sql(
            """SELECT 1 FROM "RefreshToken" WHERE left(id, 4) = 'due_' AND right(id, 1) IN ('0', '5') FOR UPDATE"""
        )
        completed = run_cli(
            "refresh-tokens", "--batch-size", batch_size, "--json", env=env_for(postgres, lock_timeout_ms=60_000)
        )
        app_conn.rollback()
    result = json.loads(completed.stdout)
    assert completed.returncode == 0, completed.stderr
    held = {row_id for row_id in due if row_id[-1] in "05"}
    assert postgres.ids("RefreshToken") == live | held
    assert (result["rows"], result["remaining"], result["remaining_exact"]) == (4_000, 1_000, True)
    # With a minute's lock_timeout, one wait would have shown as this event (and a slow run).
    assert "batch_met_held_row" not in [event["event"] for event in events(completed.stderr)]


def test_a_remaining_count_stopped_by_its_cap_says_it_is_a_lower_bound(postgres):
    seed_due_and_live(postgres, due=12_000)
    env = env_for(postgres)
    # After the first batch, a pause of 5 s would pass the 3 s cap: the run stops there.
    capped = run_cli(
        "refresh-tokens", "--batch-size", "500", "--sleep-ms", "5000", "--max-runtime", "3", "--json", env=env
    )
    result = json.loads(capped.stdout)
    assert (result["stopped_by"], result["batches"], result["remaining"], result["remaining_exact"]) == (
        "max_runtime",
        1,
        10_000,
        False,
    )
    assert 0 < result["rows"] <= 500
    human = run_cli("refresh-tokens", "--batch-size", "500", "--sleep-ms", "5000", "--max-runtime", "3", env=env)
    assert "at least 10000 due rows remain" in human.stdout
    exact = json.loads(run_cli("refresh-tokens", "--max-rows", "1000", "--json", env=env).stdout)
    left = len(remaining_ids(postgres)) - 5  # the live ones
    assert (exact["rows"], exact["remaining"], exact["remaining_exact"]) == (1000, left, True)
