"""`skybot-cleanup metrics`: one cheap snapshot of backlogs, sessions and table health.

Counts go through each task's own predicate (so they use the same index) and stop
at COUNT_CAP rows: past it the planner's estimate is reported, marked as such, so a
snapshot costs the same on a table of ten thousand rows or ten million. Table sizes
and dead tuples come from the statistics views. A table that is missing fails its
own tasks and measures, not the snapshot.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from skybot_cleanup import db, history
from skybot_cleanup.clock import human_age, iso_utc
from skybot_cleanup.errors import ConfigError
from skybot_cleanup.settings import CleanupSettings
from skybot_cleanup.tasks import REGISTRY, Registry, TableSpec, Task

COUNT_CAP = 10_000

# Summed over the leaves of pg_partition_tree (a plain table is its own only leaf): a
# partitioned table has no storage or statistics of its own.
PG_TABLE_HEALTH = sa.text("""
    WITH root AS (SELECT to_regclass(format('%I.%I', CAST(:schema AS text), CAST(:name AS text))) AS oid),
    leaves AS (
        SELECT t.relid FROM root, pg_partition_tree(root.oid) t WHERE t.isleaf
        UNION
        SELECT root.oid FROM root JOIN pg_class c ON c.oid = root.oid WHERE c.relkind <> 'p'
    )
    SELECT sum(pg_total_relation_size(l.relid))::bigint AS size_bytes, sum(s.n_dead_tup)::bigint AS dead_tuples,
           max(greatest(s.last_vacuum, s.last_autovacuum)) AS last_vacuum,
           max(greatest(s.last_analyze, s.last_autoanalyze)) AS last_analyze,
           CASE WHEN bool_and(c.reltuples >= 0) THEN sum(c.reltuples)::bigint END AS estimated_rows,
           count(*) AS partitions
    FROM leaves l
    JOIN pg_class c ON c.oid = l.relid
    LEFT JOIN pg_stat_user_tables s ON s.relid = l.relid
""")
PG_DATABASE_SIZE = sa.text("SELECT pg_database_size(current_database())")
SQLITE_DATABASE_SIZE = sa.text("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")


@dataclass
class Count:
    value: int
    estimated: bool = False  # past COUNT_CAP: the planner's estimate


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


def count(conn: sa.Connection, table: db.BoundTable, where: sa.ColumnElement[bool]) -> Count:
    """Rows matching `where`: exact up to COUNT_CAP, else the planner's estimate."""
    exact = db.count_capped(conn, table, where, COUNT_CAP + 1)
    if exact <= COUNT_CAP or conn.dialect.name != "postgresql":
        if exact > COUNT_CAP:  # SQLite (demo, tests): no planner estimate, count it all
            return Count(int(conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(where)) or 0))
        return Count(exact)
    return Count(max(db.estimate_rows(conn, table, where), COUNT_CAP + 1), estimated=True)


@dataclass
class Backlog:
    due: Count
    oldest_due_age_seconds: float


def task_backlog(conn: sa.Connection, task: Task, table: db.BoundTable, cutoff: datetime) -> Backlog:
    """Rows due now and how long the oldest has been due, in seconds (0 when only rows
    due for another reason, such as used magic links, are due)."""
    due = task.due(table.columns, cutoff)
    oldest = conn.scalar(sa.select(sa.func.min(table.columns[task.age_column])).where(due))
    age = max(0.0, round((cutoff - oldest).total_seconds(), 3)) if oldest else 0.0
    return Backlog(count(conn, table, due), age)


def bind_all(
    conn: sa.Connection, settings: CleanupSettings, schema: str | None, registry: Registry
) -> dict[str, db.BoundTable | ConfigError]:
    """Every table of the registry, or the error that says which setting to fix."""
    bound: dict[str, db.BoundTable | ConfigError] = {}
    for spec in registry.tables:
        try:
            bound[spec.key] = db.bind_table(conn, settings, schema, spec)
        except ConfigError as exc:
            bound[spec.key] = exc
    return bound


def cutoff_of(task: Task, settings: CleanupSettings, now: datetime) -> datetime:
    return now - timedelta(days=settings.retention_days(task)) if task.retention else now


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
    bound = bind_all(conn, settings, schema, registry)
    stuck = timedelta(minutes=settings.idempotency_stuck_minutes)
    for measure in registry.measures:
        table = bound[measure.table.key]
        if isinstance(table, ConfigError):
            snapshot.measures[measure.name] = None
            continue
        counted = count(conn, table, measure.where(table.columns, now, stuck))
        snapshot.measures[measure.name], snapshot.measures_estimated[measure.name] = counted.value, counted.estimated
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
        else:
            backlog = task_backlog(conn, task, table, cutoff_of(task, settings, now))
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
    row = conn.execute(PG_TABLE_HEALTH, {"schema": table.info.schema, "name": table.info.name}).mappings().one()
    if row["estimated_rows"] is not None:
        health.rows, health.rows_estimated = row["estimated_rows"], True
    else:  # never analyzed: no estimate exists yet
        health.rows = count(conn, table, sa.true()).value
    health.size_bytes, health.dead_tuples = row["size_bytes"], row["dead_tuples"]
    health.last_vacuum, health.last_analyze = iso_utc(row["last_vacuum"]), iso_utc(row["last_analyze"])
    health.partitions = row["partitions"] if table.info.partitioned else None
    return health


def render_table(snapshot: Snapshot) -> str:
    """The snapshot for a person at a terminal."""
    measures = "   ".join(
        f"{name.replace('_', ' ')} {'-' if value is None else f'{value:,}'}"
        for name, value in snapshot.measures.items()
    )
    lines = [
        f"snapshot {snapshot.taken_at}  database {_size(snapshot.database_size_bytes)}, "
        f"SELECT 1 in {snapshot.latency_seconds * 1000:.1f} ms",
        measures,
        "",
        f"{'task':<18}{'due rows':>12}{'oldest due':>12}  {'last success':<26}{'last rows':>10}  overdue",
    ]
    for task in snapshot.tasks:
        if task.error:
            lines.append(f"{task.name:<18}{'ERROR':>12}  {task.error}")
            continue
        due = f"{'~' if task.due_rows_estimated else ''}{task.due_rows or 0:,}"
        last_rows = "-" if task.last_rows is None else f"{task.last_rows:,}"
        overdue = "-" if task.overdue is None else ("YES" if task.overdue else "no")
        lines.append(
            f"{task.name:<18}{due:>12}{human_age(task.oldest_due_age_seconds):>12}  "
            f"{task.last_success_at or 'never':<26}{last_rows:>10}  {overdue}"
        )
    lines += ["", f"{'table':<18}{'rows':>14}{'size':>10}{'dead':>10}  last vacuum / analyze"]
    for table in snapshot.tables:
        if table.error:
            lines.append(f"{table.name:<18}{'ERROR':>14}  {table.error}")
            continue
        rows = f"{'~' if table.rows_estimated else ''}{table.rows or 0:,}"
        dead = "-" if table.dead_tuples is None else f"{table.dead_tuples:,}"
        lines.append(
            f"{table.name:<18}{rows:>14}{_size(table.size_bytes):>10}{dead:>10}  "
            f"{table.last_vacuum or 'never'} / {table.last_analyze or 'never'}"
        )
    return "\n".join(lines)


def _size(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
