"""The exact rows each task deletes and keeps, at and around every cutoff.

The checks are functions of a Suite (a registry, its seed rows and expected
deletions), so test_registry.py runs them unchanged on a registry with a fifth task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from cases import DAY, DELETED, MS, SEED, all_ids, expected_after, seed
from conftest import NOW

from skybot_cleanup import db
from skybot_cleanup.cleanup import run_task
from skybot_cleanup.demo import idempotency_key_row, refresh_token_row
from skybot_cleanup.settings import CleanupSettings, load
from skybot_cleanup.tasks import REGISTRY, Registry, Task


@dataclass
class Suite:
    registry: Registry = REGISTRY
    seed: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: SEED)
    deleted: dict[str, set[str]] = field(default_factory=lambda: DELETED)

    def settings(self, url: str, **overrides: Any) -> CleanupSettings:
        return load({"database_url": url, **overrides}, registry=self.registry).settings


DEFAULT = Suite()
TASK_NAMES = [task.name for task in REGISTRY.tasks]


def check_deletes_exactly_the_due_rows(backend, suite: Suite, task: Task, **overrides: Any) -> None:
    seeded = seed(backend, suite.seed)
    result = run_task(suite.settings(backend.url, **overrides), task, now=NOW)
    assert (result.status, result.exit_code, result.error) == ("ok", 0, None)
    assert result.rows == len(suite.deleted[task.name])
    assert all_ids(backend, suite.seed) == expected_after(seeded, suite.deleted[task.name])


def check_dry_run_counts_and_changes_nothing(backend, suite: Suite, task: Task) -> None:
    seeded = seed(backend, suite.seed)
    result = run_task(suite.settings(backend.url), task, dry_run=True, now=NOW)
    assert (result.status, result.dry_run, result.rows) == ("ok", True, len(suite.deleted[task.name]))
    assert all_ids(backend, suite.seed) == seeded


def check_second_run_deletes_nothing(backend, suite: Suite) -> None:
    seeded = seed(backend, suite.seed)
    settings = suite.settings(backend.url)
    first = {task.name: run_task(settings, task, now=NOW).rows for task in suite.registry.tasks}
    second = {task.name: run_task(settings, task, now=NOW).rows for task in suite.registry.tasks}
    assert first == {name: len(ids) for name, ids in suite.deleted.items()}
    assert second == dict.fromkeys(suite.deleted, 0)
    assert all_ids(backend, suite.seed) == expected_after(seeded, set().union(*suite.deleted.values()))


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
        table = db.bind_table(conn, settings, None, task.table)
        statement = sa.delete(table.table).where(task.due(table.columns, NOW - 90 * DAY if task.retention else NOW))
        compiled = statement.compile(conn)
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params).scalars())
    column = "revokedAt" if task_name == "revoked-tokens" else "expiresAt"
    assert f'Index Scan using "{index}"' in plan or f'Bitmap Index Scan on "{index}"' in plan, plan
    assert f'Index Cond: ("{column}" < ' in plan, plan


PARTITIONED_REFRESH_TOKEN = """
DROP TABLE "RefreshToken";
CREATE TABLE "RefreshToken" (
    id text NOT NULL, token text NOT NULL, "userAccountId" text NOT NULL, "accountId" text NOT NULL,
    "expiresAt" timestamp(3) NOT NULL, "revokedAt" timestamp(3), "revokedReason" text, "deviceInfo" jsonb,
    "ipAddress" text, "userAgent" text, "lastUsedAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" timestamp(3) NOT NULL,
    PRIMARY KEY (id, "expiresAt")
) PARTITION BY RANGE ("expiresAt");
CREATE INDEX ON "RefreshToken" ("expiresAt");
CREATE INDEX ON "RefreshToken" ("revokedAt");
CREATE TABLE "RefreshToken_old" PARTITION OF "RefreshToken" FOR VALUES FROM (MINVALUE) TO ('{old}');
CREATE TABLE "RefreshToken_recent" PARTITION OF "RefreshToken" FOR VALUES FROM ('{old}') TO ('{soon}');
CREATE TABLE "RefreshToken_future" PARTITION OF "RefreshToken" FOR VALUES FROM ('{soon}') TO (MAXVALUE);
"""


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
