"""`skybot-cleanup metrics`: one cheap snapshot of backlogs, sessions and table health.

Counts go through each task's own predicate (so they use the same index) and stop
at db.COUNT_CAP rows: past it the planner's estimate is reported, marked as such, so a
snapshot costs the same on a table of ten thousand rows or ten million. Table sizes
and dead tuples come from the statistics views. A table that is missing fails its
own tasks and measures, not the snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import sqlalchemy as sa

from skybot_cleanup import db, history
from skybot_cleanup.clock import iso_utc
from skybot_cleanup.cutoff import cutoff
from skybot_cleanup.errors import ConfigError, classify
from skybot_cleanup.registry import REGISTRY, Registry, TableSpec
from skybot_cleanup.settings import CleanupSettings

T = TypeVar("T")

PG_DATABASE_SIZE = sa.text("SELECT pg_catalog.pg_database_size(pg_catalog.current_database())")
SQLITE_DATABASE_SIZE = sa.text("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")


@dataclass
class TaskSnapshot:
    name: str
    schedule: str
    due_rows: int | None = None
    due_rows_estimated: bool = False
    oldest_due_age_seconds: float | None = None
    last_success_at: str | None = None
    last_rows: int | None = None
    last_status: str | None = None
    overdue: bool | None = None
    error: str | None = None


@dataclass
class TableHealth:
    name: str
    rows: int | None = None
    rows_estimated: bool = False
    size_bytes: int | None = None
    dead_tuples: int | None = None
    last_vacuum: str | None = None
    last_analyze: str | None = None
    partitions: int | None = None  # a partitioned table: how many leaf partitions
    error: str | None = None


@dataclass
class Snapshot:
    taken_at: str
    database_size_bytes: int | None
    latency_seconds: float
    measures: dict[str, int | None] = field(default_factory=dict)
    measures_estimated: dict[str, bool] = field(default_factory=dict)
    tasks: list[TaskSnapshot] = field(default_factory=list)
    tables: list[TableHealth] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        errors = [task.error for task in self.tasks] + [table.error for table in self.tables]
        return sorted({error for error in errors if error})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"errors": self.errors}


def _measured(conn: sa.Connection, measure: Callable[[], T]) -> T | str:
    """A measurement, or why it could not be taken (a missing grant, a timeout): one table
    the role cannot read must not cost the snapshot of the others."""
    try:
        with db.savepoint(conn, "measure"):
            return measure()
    except sa.exc.DBAPIError as exc:
        return classify(exc).message


def collect(
    conn: sa.Connection, settings: CleanupSettings, schema: str | None, now: datetime, registry: Registry = REGISTRY
) -> Snapshot:
    started = time.perf_counter()
    conn.exec_driver_sql("SELECT 1")
    latency = time.perf_counter() - started
    on_postgres = conn.dialect.name == "postgresql"
    snapshot = Snapshot(
        taken_at=iso_utc(now) or "",
        database_size_bytes=conn.scalar(PG_DATABASE_SIZE if on_postgres else SQLITE_DATABASE_SIZE),
        latency_seconds=round(latency, 6),
    )
    bound = db.bind_all(conn, schema, registry, settings.all_table_names(registry))
    stuck = timedelta(minutes=settings.idempotency_stuck_minutes)
    for measure in registry.measures:
        table = bound[measure.table.key]
        counted = (
            None
            if isinstance(table, ConfigError) or table.info.rls_hides_rows
            else _measured(conn, partial(db.count, conn, table, measure.where(table.columns, now, stuck)))
        )
        if isinstance(counted, db.Count):
            snapshot.measures[measure.name] = counted.value
            snapshot.measures_estimated[measure.name] = counted.estimated
        else:
            snapshot.measures[measure.name] = None
    for spec in registry.tables:
        snapshot.tables.append(_table_health(conn, spec, bound[spec.key]))
    state = history.read_state(conn, settings, [task.name for task in registry.tasks])
    grace = timedelta(minutes=settings.grace_minutes)
    for task in registry.tasks:
        past = state.tasks[task.name]
        judged = state.health(task.name, task.schedule, now, grace)
        entry = TaskSnapshot(
            name=task.name,
            schedule=task.schedule,
            last_success_at=iso_utc(past.last_success_at),
            last_rows=past.last_success_rows,
            last_status=past.last_status,
            overdue=judged == "OVERDUE",
        )
        table = bound[task.table.key]
        if isinstance(table, ConfigError):
            entry.error = str(table)
        elif table.info.rls_warning:
            entry.error = f"backlog not measurable: {table.info.rls_warning}"
        else:
            backlog = _measured(conn, partial(db.task_backlog, conn, task, table, cutoff(task, now, settings)))
            if isinstance(backlog, str):
                entry.error = f"{task.name}: backlog not measurable: {backlog}"
            else:
                entry.due_rows, entry.due_rows_estimated = backlog.due.value, backlog.due.estimated
                entry.oldest_due_age_seconds = backlog.oldest_due_age_seconds
        snapshot.tasks.append(entry)
    return snapshot


def _table_health(conn: sa.Connection, spec: TableSpec, table: db.BoundTable | ConfigError) -> TableHealth:
    if isinstance(table, ConfigError):
        return TableHealth(name=spec.name, error=str(table))
    health = TableHealth(name=table.table.name)
    if conn.dialect.name != "postgresql":
        health.rows = int(conn.scalar(sa.select(sa.func.count()).select_from(table.table)) or 0)
        return health
    row = db.table_health(conn, table.info)
    if row["estimated_rows"] is not None:
        health.rows, health.rows_estimated = row["estimated_rows"], True
    else:  # never analyzed: no estimate exists yet (and a role without SELECT cannot count)
        counted = _measured(conn, lambda: db.count(conn, table, sa.true()))
        health.rows = counted.value if isinstance(counted, db.Count) else None
    health.size_bytes, health.dead_tuples = row["size_bytes"], row["dead_tuples"]
    health.last_vacuum, health.last_analyze = iso_utc(row["last_vacuum"]), iso_utc(row["last_analyze"])
    health.partitions = row["partitions"] if table.info.partitioned else None
    return health
