"""Each task deletes exactly the rows its rule names: boundaries, time zones, retention, ties, partitions."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from cases import (
    DEFAULT,
    DELETED,
    MS,
    PARTITIONED_REFRESH_TOKEN,
    all_ids,
    check_deletes_exactly_the_due_rows,
    check_dry_run_counts_and_changes_nothing,
    check_second_run_deletes_nothing,
    expected_after,
    seed,
)
from helpers import DAY, HOUR, NOW, TASK_NAMES, run_cli, seed_tokens

from skybot_cleanup import db
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import idempotency_key_row, refresh_token_row
from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.run import run_task


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_console_script_in_far_time_zones(backend, zone):
    """Both the machine's and the session's zone far from UTC; real 'now'."""
    seed_tokens(backend)
    backend.insert(
        "IdempotencyKey",
        [idempotency_key_row("ik_expired", utc_now() - HOUR), idempotency_key_row("ik_live", utc_now() + HOUR)],
    )
    completed = run_cli("all", "--json", env={"DATABASE_URL": backend.url, "TZ": zone, "PGTZ": zone})
    assert completed.returncode == 0, completed.stderr
    rows = {o["task"]: o["rows"] for o in map(json.loads, completed.stdout.splitlines())}
    assert rows == {name: 0 for name in TASK_NAMES} | {"idempotency-keys": 1, "refresh-tokens": 2}
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}
    assert backend.ids("IdempotencyKey") == {"ik_live"}


def test_every_task_has_boundary_cases():
    assert set(DELETED) == set(TASK_NAMES)


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_deletes_exactly_the_due_rows(backend, task_name):
    check_deletes_exactly_the_due_rows(backend, DEFAULT, REGISTRY.task(task_name))


# Batches of 1 and 2 cross every boundary of the walk column, ties included.
@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_batches_delete_exactly_the_due_rows(backend, task_name, batch_size):
    check_deletes_exactly_the_due_rows(backend, DEFAULT, REGISTRY.task(task_name), batch_size=batch_size)


# The server's zone must not move the cutoff: Kiritimati is UTC+14, Pago Pago UTC-11.
@pytest.mark.parametrize("server_time_zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago"])
@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_server_time_zone_does_not_move_the_cutoff(postgres, task_name, server_time_zone):
    postgres.execute(f"ALTER DATABASE \"{postgres.database}\" SET timezone TO '{server_time_zone}'")
    check_deletes_exactly_the_due_rows(postgres, DEFAULT, REGISTRY.task(task_name))


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_dry_run_counts_and_changes_nothing(backend, task_name):
    check_dry_run_counts_and_changes_nothing(backend, DEFAULT, REGISTRY.task(task_name))


def test_second_run_deletes_nothing(backend):
    check_second_run_deletes_nothing(backend, DEFAULT)


def test_revoked_retention_is_a_setting(backend):
    seeded = seed(backend)
    result = run_task(DEFAULT.settings(backend.url, revoked_retention_days=1), REGISTRY.task("revoked-tokens"), now=NOW)
    # Revoked a day ago exactly is kept (strictly older only).
    expected = DELETED["revoked-tokens"] | {"rt_revoked_audit_minus_1ms", "rt_revoked_exactly_audit"}
    assert result.rows == len(expected)
    assert result.cutoff == "2026-11-27T12:00:00.500Z"
    assert all_ids(backend) == expected_after(seeded, expected)


def test_cutoff_is_reported_in_utc(sqlite):
    result = run_task(DEFAULT.settings(sqlite.url), REGISTRY.task("revoked-tokens"), now=NOW)
    assert result.cutoff == "2026-08-30T12:00:00.500Z"


def test_a_mass_revocation_larger_than_a_batch_is_deleted_in_bounded_batches(backend):
    """Thousands of tokens revoked by one statement share one "revokedAt": batches
    of ties, each bounded by the batch size."""
    revoked_at = NOW - 100 * DAY
    backend.insert(
        "RefreshToken",
        [refresh_token_row(f"mass_{i:03d}", NOW + DAY, revoked=revoked_at) for i in range(25)]
        + [refresh_token_row("kept", NOW + DAY, revoked=NOW - DAY)],
    )
    result = run_task(DEFAULT.settings(backend.url, batch_size=10), REGISTRY.task("revoked-tokens"), now=NOW)
    assert (result.status, result.rows, result.remaining) == ("ok", 25, 0)
    assert result.batches is not None and result.batches >= 3  # 10 + 10 + 5, never 25 at once
    assert backend.ids("RefreshToken") == {"kept"}


@pytest.mark.parametrize(
    ("task_name", "index"),
    [
        ("idempotency-keys", "IdempotencyKey_expiresAt_idx"),
        ("refresh-tokens", "RefreshToken_expiresAt_idx"),
        ("revoked-tokens", "RefreshToken_revokedAt_idx"),
    ],
)
def test_predicate_can_use_the_index(postgres, task_name, index):
    """The bound cutoff keeps the column's type: the planner can range-scan its index."""
    task = REGISTRY.task(task_name)
    settings = DEFAULT.settings(postgres.url)
    # Realistic statistics: most rows live and unrevoked, a few due.
    postgres.insert(
        "RefreshToken",
        [
            refresh_token_row(f"rt{i}", NOW + (i - 50) * DAY, revoked=NOW - (i - 5) * DAY if i % 97 == 0 else None)
            for i in range(3000)
        ],
    )
    postgres.insert("IdempotencyKey", [idempotency_key_row(f"ik{i}", NOW + (i - 50) * MS * 1000) for i in range(3000)])
    postgres.execute("ANALYZE")
    with postgres.engine.connect() as conn:
        conn.exec_driver_sql("SET timezone = 'Asia/Tokyo'")
        table = db.bind_table(conn, "public", task.table, settings.table_names(task.table))
        statement = sa.delete(table.table).where(task.due(table.columns, NOW - 90 * DAY if task.retention else NOW))
        compiled = statement.compile(conn)
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params).scalars())
    column = "revokedAt" if task_name == "revoked-tokens" else "expiresAt"
    assert f'Index Scan using "{index}"' in plan or f'Bitmap Index Scan on "{index}"' in plan, plan
    assert f'Index Cond: ("{column}" < ' in plan, plan


@pytest.mark.parametrize("batch_size", [None, 1, 10])
@pytest.mark.parametrize("task_name", ["refresh-tokens", "revoked-tokens"])
def test_a_partitioned_table_is_cleaned_exactly(postgres, task_name, batch_size):
    """Every partition is reached, and a mass revocation spread over two partitions is
    deleted in whole, exact batches."""
    postgres.execute(PARTITIONED_REFRESH_TOKEN.format(old=NOW - 60 * DAY, soon=NOW + DAY))
    mass = mass_revocation()
    postgres.insert("RefreshToken", mass)
    seeded = seed(postgres)
    overrides = {"batch_size": batch_size} if batch_size else {}
    result = run_task(DEFAULT.settings(postgres.url, **overrides), REGISTRY.task(task_name), now=NOW)
    expected = DELETED[task_name] | ({row["id"] for row in mass} if task_name == "revoked-tokens" else set())
    assert (result.status, result.rows) == ("ok", len(expected)), result.error
    assert all_ids(postgres) == expected_after(seeded, expected)


def mass_revocation() -> list[dict]:
    """50 tokens revoked by one statement, half in the old partition and half in the
    recent one: the same "revokedAt", and the same positions (ctids) in both."""
    revoked_at = NOW - 100 * DAY
    return [refresh_token_row(f"mass_old_{i:02d}", NOW - 200 * DAY, revoked=revoked_at) for i in range(25)] + [
        refresh_token_row(f"mass_recent_{i:02d}", NOW - 30 * DAY, revoked=revoked_at) for i in range(25)
    ]


def test_batches_of_equal_values_stay_bounded_across_partitions(postgres):
    """A ctid names a row in every partition: picking a batch by ctid would take twice
    the rows asked for. By primary key, --max-rows 10 is 10."""
    postgres.execute(PARTITIONED_REFRESH_TOKEN.format(old=NOW - 60 * DAY, soon=NOW + DAY))
    postgres.insert("RefreshToken", mass_revocation())
    settings = DEFAULT.settings(postgres.url, batch_size=10, max_rows=10)
    result = run_task(settings, REGISTRY.task("revoked-tokens"), now=NOW)
    assert (result.status, result.rows, result.remaining, result.stopped_by) == ("ok", 10, 40, "max_rows")
    assert len(postgres.ids("RefreshToken")) == 40
