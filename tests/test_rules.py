"""The exact rows each task deletes and keeps, at and around every cutoff."""

from __future__ import annotations

import pytest

from cases import DAY, DELETED, MS, SEED, all_ids, expected_after, seed
from conftest import NOW
from skybot_cleanup.cleanup import run_task
from skybot_cleanup.demo import idempotency_key_row, refresh_token_row
from skybot_cleanup.settings import load_settings
from skybot_cleanup.tasks import TASKS, TASKS_BY_NAME


def test_every_task_has_boundary_cases():
    assert set(DELETED) == {task.name for task in TASKS}


def assert_deletes_exactly_the_due_rows(backend, task_name, **overrides):
    seeded = seed(backend)
    settings = load_settings(database_url=backend.url, **overrides)

    result = run_task(settings, TASKS_BY_NAME[task_name], now=NOW)

    assert (result.status, result.exit_code, result.error) == ("ok", 0, None)
    assert result.rows == len(DELETED[task_name])
    assert all_ids(backend) == expected_after(seeded, DELETED[task_name])


@pytest.mark.parametrize("task_name", sorted(DELETED))
def test_deletes_exactly_the_due_rows(backend, task_name):
    assert_deletes_exactly_the_due_rows(backend, task_name)


# Batches of 1 and 2 cross every boundary of the walk column, ties included.
@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("task_name", sorted(DELETED))
def test_batches_delete_exactly_the_due_rows(backend, task_name, batch_size):
    assert_deletes_exactly_the_due_rows(backend, task_name, batch_size=batch_size)


# The server's zone must not move the cutoff: Kiritimati is UTC+14, Pago Pago UTC-11.
@pytest.mark.parametrize("server_time_zone", ["Pacific/Kiritimati", "Pacific/Pago_Pago"])
@pytest.mark.parametrize("task_name", sorted(DELETED))
def test_server_time_zone_does_not_move_the_cutoff(postgres, task_name, server_time_zone):
    database = postgres.engine.url.database
    postgres.execute(f"ALTER DATABASE \"{database}\" SET timezone TO '{server_time_zone}'")
    assert_deletes_exactly_the_due_rows(postgres, task_name)


@pytest.mark.parametrize("task_name", sorted(DELETED))
def test_dry_run_counts_and_changes_nothing(backend, task_name):
    seeded = seed(backend)
    settings = load_settings(database_url=backend.url)

    result = run_task(settings, TASKS_BY_NAME[task_name], dry_run=True, now=NOW)

    assert (result.status, result.dry_run, result.rows) == ("ok", True, len(DELETED[task_name]))
    assert all_ids(backend) == seeded


def test_second_run_deletes_nothing(backend):
    seeded = seed(backend)
    settings = load_settings(database_url=backend.url)
    first = [run_task(settings, task, now=NOW).rows for task in TASKS]
    second = [run_task(settings, task, now=NOW).rows for task in TASKS]
    assert first == [len(DELETED[task.name]) for task in TASKS]
    assert second == [0, 0, 0, 0]
    assert all_ids(backend) == expected_after(seeded, set().union(*DELETED.values()))


def test_revoked_retention_is_a_setting(backend):
    seeded = seed(backend)
    settings = load_settings(database_url=backend.url, revoked_retention_days=1)
    result = run_task(settings, TASKS_BY_NAME["revoked-tokens"], now=NOW)
    # Revoked a day ago exactly is kept (strictly older only); the 1d-ago one is
    # revoked at NOW - 1 day, the same instant, so it stays too.
    expected = DELETED["revoked-tokens"] | {"rt_revoked_audit_minus_1ms", "rt_revoked_exactly_audit"}
    assert result.rows == len(expected)
    assert result.cutoff == "2026-11-27T12:00:00.500Z"
    assert all_ids(backend) == expected_after(seeded, expected)


def test_cutoff_is_reported_in_utc(sqlite):
    result = run_task(load_settings(database_url=sqlite.url), TASKS_BY_NAME["revoked-tokens"], now=NOW)
    assert result.cutoff == "2026-08-30T12:00:00.500Z"


@pytest.mark.parametrize("task_name, index", [
    ("idempotency-keys", "IdempotencyKey_expiresAt_idx"),
    ("refresh-tokens", "RefreshToken_expiresAt_idx"),
    ("revoked-tokens", "RefreshToken_revokedAt_idx"),
])
def test_predicate_can_use_the_index(postgres, task_name, index):
    """The bound cutoff keeps the column's type: the planner can range-scan its index."""
    import sqlalchemy as sa

    from skybot_cleanup import db

    task = TASKS_BY_NAME[task_name]
    settings = load_settings(database_url=postgres.url)
    # Realistic statistics: most rows live and unrevoked, a few due.
    postgres.insert("RefreshToken", [refresh_token_row(f"rt{i}", NOW + (i - 50) * DAY,
                                                       revoked=NOW - (i - 5) * DAY if i % 97 == 0 else None)
                                     for i in range(3000)])
    postgres.insert("IdempotencyKey", [idempotency_key_row(f"ik{i}", NOW + (i - 50) * MS * 1000)
                                       for i in range(3000)])
    postgres.execute("ANALYZE")
    with postgres.engine.connect() as conn:
        conn.exec_driver_sql("SET timezone = 'Asia/Tokyo'")
        table, columns = db.bind_table(conn, settings, None, task.table)
        statement = sa.delete(table).where(task.due(columns, task.cutoff(NOW, settings)))
        compiled = statement.compile(conn)
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params).scalars())
    column = "revokedAt" if task_name == "revoked-tokens" else "expiresAt"
    assert f'Index Scan using "{index}"' in plan or f'Bitmap Index Scan on "{index}"' in plan, plan
    assert f'Index Cond: ("{column}" < ' in plan, plan
