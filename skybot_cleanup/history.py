"""Run history and metric snapshots, kept in the tool's own tables.

On PostgreSQL they live in a schema of their own (`skybot_cleanup` by default), so
the app's Prisma migrations and drift checks never see them; on SQLite, whose
databases have no schemas, the table names carry a prefix instead. Recording is
best effort: a cleanup never fails because its history could not be written.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from skybot_cleanup.logs import get_logger

_warned = False


@dataclass(frozen=True)
class HistoryTables:
    runs: sa.Table
    snapshots: sa.Table


def history_tables(dialect_name: str, schema: str) -> HistoryTables:
    on_sqlite = dialect_name == "sqlite"
    prefix = f"{schema}_" if on_sqlite else ""
    metadata = sa.MetaData(schema=None if on_sqlite else schema)
    runs = sa.Table(
        f"{prefix}runs", metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("dry_run", sa.Boolean, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("cutoff", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=False),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("exit_code", sa.SmallInteger, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("error_class", sa.Text),
        sa.Column("error", sa.Text),
        # status and last-success queries read the newest rows of one task.
        sa.Index(f"{prefix}runs_task_finished_idx", "task", "finished_at"),
        sa.Index(f"{prefix}runs_finished_idx", "finished_at"),
    )
    snapshots = sa.Table(
        f"{prefix}metric_snapshots", metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("taken_at", sa.DateTime, nullable=False, index=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("snapshot", sa.Text, nullable=False),  # JSON, as text for SQLite's sake
    )
    return HistoryTables(runs, snapshots)


def ensure_tables(conn: Connection, tables: HistoryTables, schema: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
    tables.runs.metadata.create_all(conn, checkfirst=True)


def _prune(conn: Connection, tables: HistoryTables, retention_days: int, now: datetime) -> None:
    horizon = now - timedelta(days=retention_days)
    conn.execute(sa.delete(tables.runs).where(tables.runs.c.finished_at < horizon))
    conn.execute(sa.delete(tables.snapshots).where(tables.snapshots.c.taken_at < horizon))


def _warn_once(exc: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        from skybot_cleanup.errors import classify

        failure = classify(exc)
        get_logger().warning("history_unavailable", error_class=failure.error_class, error=failure.message,
                             hint="the cleanup itself is unaffected; set SKYBOT_CLEANUP_HISTORY=false to stop trying")


def record(engine: Engine, settings, *, run: dict | None = None, snapshot: dict | None = None,
           now: datetime) -> bool:
    """Write one run or snapshot, create the tables if needed, prune old rows. Never raises."""
    if not settings.history:
        return False
    try:
        tables = history_tables(engine.dialect.name, settings.history_schema)
        with engine.begin() as conn:
            ensure_tables(conn, tables, settings.history_schema)
            if run is not None:
                conn.execute(tables.runs.insert(), {**run, "host": socket.gethostname()})
            if snapshot is not None:
                conn.execute(tables.snapshots.insert(), {"taken_at": now, "host": socket.gethostname(),
                                                         "snapshot": json.dumps(snapshot, default=str)})
            _prune(conn, tables, settings.history_retention_days, now)
        return True
    except Exception as exc:  # best effort, by design
        _warn_once(exc)
        return False


@dataclass
class TaskHistory:
    last_success_at: datetime | None = None
    last_success_rows: int | None = None
    last_failure_at: datetime | None = None
    last_failure_status: str | None = None
    last_failure_error: str | None = None

    @property
    def last_status(self) -> str | None:
        """Status of the newest real run: the later of the last success and the last failure."""
        if self.last_failure_at and (not self.last_success_at or self.last_failure_at > self.last_success_at):
            return self.last_failure_status
        return "ok" if self.last_success_at else None


def task_histories(conn: Connection, settings, task_names: list[str]) -> dict[str, TaskHistory]:
    """Last success and last failure of each task (dry runs and skips aside). Empty when
    history is off or was never written."""
    found = {name: TaskHistory() for name in task_names}
    if not settings.history:
        return found
    runs = history_tables(conn.dialect.name, settings.history_schema).runs
    if not sa.inspect(conn).has_table(runs.name, schema=runs.schema):
        return found
    real = sa.and_(runs.c.dry_run.is_(False), runs.c.status.in_(["ok", "failed", "interrupted"]))
    for name in task_names:
        newest = (sa.select(runs).where(runs.c.task == name, real)
                  .order_by(runs.c.finished_at.desc()).limit(1))
        success = conn.execute(newest.where(runs.c.status == "ok")).mappings().first()
        failure = conn.execute(newest.where(runs.c.status != "ok")).mappings().first()
        history = found[name]
        if success:
            history.last_success_at, history.last_success_rows = success["finished_at"], success["rows"]
        if failure:
            history.last_failure_at, history.last_failure_status = failure["finished_at"], failure["status"]
            history.last_failure_error = f"{failure['error_class']}: {failure['error']}"
    return found
