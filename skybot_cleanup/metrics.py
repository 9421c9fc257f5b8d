"""`skybot-cleanup metrics`: one cheap snapshot of backlogs, sessions and table health.

Counts go through each task's own predicate (so they use the same index) and stop
at db.COUNT_CAP rows: past it the planner's estimate is reported, marked as such, so a
snapshot costs the same on a table of ten thousand rows or ten million. Table sizes
and dead tuples come from the statistics views. A table that is missing fails its
own tasks and measures, not the snapshot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from skybot_cleanup import db, health
from skybot_cleanup.clock import iso_utc
from skybot_cleanup.errors import ConfigError
from skybot_cleanup.registry import REGISTRY, Registry, TableSpec, Task
from skybot_cleanup.settings import Settings
from skybot_cleanup.vocabulary import Health

PG_DATABASE_SIZE = sa.func.pg_catalog.pg_database_size(sa.func.pg_catalog.current_database())
SQLITE_DATABASE_SIZE = sa.literal_column(
    "(SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size())", sa.BigInteger
)


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
    # Why the history could not be read or written (another role's schema or code).
    history_refused: str | None = None

    @property
    def errors(self) -> list[str]:
        errors = [task.error for task in self.tasks] + [table.error for table in self.tables]
        return sorted({error for error in errors if error})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"errors": self.errors}


def take_snapshot(
    run: db.RunConnection, settings: Settings, schema: str | None, now: datetime, registry: Registry = REGISTRY
) -> Snapshot:
    """The snapshot, in the reads of the one judgement (health.Judging) plus its own: the
    database's size, the measures, the row counts of tables never analyzed. Latency is the
    round trip that began the transaction."""
    judging = health.Judging(run, settings, schema, now, registry)
    reads, bound = judging.reads, judging.bound
    size = reads.add(sa.select(PG_DATABASE_SIZE if run.on_postgres else SQLITE_DATABASE_SIZE))
    stuck = timedelta(minutes=settings.idempotency_stuck_minutes)
    measures: dict[str, db.CountReading | None] = {}
    for measure in registry.measures:
        table = bound[measure.table.key]
        measurable = isinstance(table, db.BoundTable) and table.info.can_select and not table.info.rls_hides_rows
        measures[measure.name] = (
            db.CountReading(reads, table, measure.where(table.columns, now, stuck))
            if measurable and isinstance(table, db.BoundTable)
            else None
        )
    # A table never analyzed has no estimate yet: counted (up to the cap) instead.
    rows: dict[str, db.CountReading] = {
        key: db.CountReading(reads, table, sa.true())
        for key, table in bound.items()
        if isinstance(table, db.BoundTable) and table.info.estimated_rows is None and table.info.can_select
    }
    db.read_counts(reads, [*judging.counts.values(), *(m for m in measures.values() if m), *rows.values()])
    judgement = judging.verdict()
    snapshot = Snapshot(
        taken_at=iso_utc(now) or "",
        database_size_bytes=size.scalar(),
        latency_seconds=round(run.round_trip_s or 0.0, 6),
        history_refused=judging.history_problem,
    )
    for name, reading in measures.items():
        counted = reading.count() if reading is not None and reading.error is None else None
        snapshot.measures[name] = counted.value if counted else None
        snapshot.measures_estimated[name] = counted.estimated if counted else False
    for spec in registry.tables:
        snapshot.tables.append(_table_health(spec, bound[spec.key], rows.get(spec.key)))
    for judged in judgement.jobs:
        if isinstance(judged.job, Task):
            snapshot.tasks.append(_task_snapshot(judged))
    return snapshot


def _task_snapshot(judged: health.JobHealth) -> TaskSnapshot:
    past, backlog = judged.past, judged.backlog
    entry = TaskSnapshot(
        name=judged.job.name,
        schedule=judged.job.schedule,
        last_success_at=iso_utc(past.last_success_at),
        last_rows=past.last_success_rows,
        last_status=past.last_status,
        overdue=judged.health is Health.OVERDUE,
        error=judged.problem,
    )
    if backlog is not None and backlog.due is not None:
        entry.due_rows, entry.due_rows_estimated = backlog.due.value, backlog.due.estimated
        entry.oldest_due_age_seconds = backlog.oldest_due_age_s
    return entry


def _table_health(spec: TableSpec, table: db.BoundTable | ConfigError, counted: db.CountReading | None) -> TableHealth:
    if isinstance(table, ConfigError):
        return TableHealth(name=spec.name, error=str(table))
    info = table.info
    health_ = TableHealth(name=table.table.name)
    if info.estimated_rows is not None:
        health_.rows, health_.rows_estimated = info.estimated_rows, True
    elif counted is not None and counted.error is None:  # never analyzed: counted (a role without SELECT cannot)
        health_.rows = counted.count().value
    if info.schema is None:  # SQLite: no sizes or statistics
        return health_
    health_.size_bytes, health_.dead_tuples = info.size_bytes, info.dead_tuples
    health_.last_vacuum, health_.last_analyze = iso_utc(info.last_vacuum), iso_utc(info.last_analyze)
    health_.partitions = info.leaves if info.shape is db.TableShape.PARTITIONED else None
    return health_
