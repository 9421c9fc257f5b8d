"""Run history and metric snapshots, kept in the tool's own tables, with a local spool
for the runs the database could not take.

On PostgreSQL the tables live in a schema of their own (`skybot_cleanup` by
default), so the app's Prisma migrations and drift checks never see them; on
SQLite, whose databases have no schemas, the table names carry a prefix instead.

Recording is best effort and cheap: an INSERT and a pruning DELETE in one bounded
transaction. The tables are created the first time an insert finds them missing,
under an advisory lock (two first runs at once would otherwise collide in the
catalog), and creating them needs the database's CREATE privilege only when the
schema does not exist yet. A run that cannot write its row (database down, no
privilege) leaves it in the state directory, and the next run that can write
records it with its real time and error.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from skybot_cleanup import db, schedule
from skybot_cleanup.clock import iso_utc, parse_iso, utc_now
from skybot_cleanup.errors import classify
from skybot_cleanup.logs import get_logger
from skybot_cleanup.settings import CleanupSettings

_warned: set[str] = set()
REAL_STATUSES = ("ok", "failed", "interrupted")  # what a scheduled run can end as (skips aside)


class Outcome(Protocol):
    """What history needs of a run's result (cleanup.RunResult)."""

    task: str
    status: str
    dry_run: bool
    rows: int
    cutoff: str
    duration_ms: int
    run_id: str
    exit_code: int
    finished_at: str | None
    error_class: str | None
    error: str | None


@dataclass(frozen=True)
class HistoryTables:
    runs: sa.Table
    snapshots: sa.Table
    meta: sa.Table


def history_tables(dialect_name: str, schema: str) -> HistoryTables:
    on_sqlite = dialect_name == "sqlite"
    prefix = f"{schema}_" if on_sqlite else ""
    metadata = sa.MetaData(schema=None if on_sqlite else schema)
    big_id = sa.BigInteger().with_variant(sa.Integer, "sqlite")
    runs = sa.Table(
        f"{prefix}runs",
        metadata,
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
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
        # status, history and last-success queries read the newest rows of one task.
        sa.Index(f"{prefix}runs_task_finished_idx", "task", "finished_at"),
        sa.Index(f"{prefix}runs_finished_idx", "finished_at"),
    )
    snapshots = sa.Table(
        f"{prefix}metric_snapshots",
        metadata,
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("taken_at", sa.DateTime, nullable=False, index=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("snapshot", sa.Text, nullable=False),  # JSON, as text for SQLite's sake
    )
    # When the tool first saw this database: status shows never-run tasks PENDING until then.
    meta = sa.Table(
        f"{prefix}meta",
        metadata,
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    return HistoryTables(runs, snapshots, meta)


def _tables(conn: Connection, settings: CleanupSettings) -> HistoryTables:
    return history_tables(conn.dialect.name, settings.history_schema)


# -- writing ----------------------------------------------------------------------------------

_DDL_LOCK = "history-ddl"


def ensure_tables(conn: Connection, tables: HistoryTables, schema: str) -> None:
    """Create what is missing, serialised across processes; needs no database CREATE
    privilege when the schema exists (CREATE SCHEMA IF NOT EXISTS would)."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": db.lock_key(_DDL_LOCK)}
        )
        if not db.schema_exists(conn, schema):
            conn.execute(sa.schema.CreateSchema(schema))
    tables.runs.metadata.create_all(conn, checkfirst=True)
    seen = sa.select(tables.meta.c.key).where(tables.meta.c.key == "first_seen")
    if conn.scalar(seen) is None:
        conn.execute(tables.meta.insert(), {"key": "first_seen", "value": iso_utc(utc_now())})


def _missing_table(exc: sa.exc.DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate in ("42P01", "3F000") or "no such table" in str(exc.orig)


def _write(
    bind: Connection | Engine,
    settings: CleanupSettings,
    rows: list[dict[str, Any]] | None = None,
    snapshot: tuple[datetime, str] | None = None,
) -> None:
    """Through the run's own connection when it has one (no second connect), else a new one."""
    with bind.connect() if isinstance(bind, Engine) else contextlib.nullcontext(bind) as conn:
        run = db.RunConnection(conn, settings, "history")
        run.begin()
        try:
            tables = _tables(conn, settings)

            def insert() -> None:
                if rows:
                    conn.execute(tables.runs.insert(), rows)
                if snapshot:
                    conn.execute(
                        tables.snapshots.insert(),
                        {"taken_at": snapshot[0], "host": socket.gethostname(), "snapshot": snapshot[1]},
                    )

            try:
                insert()
            except sa.exc.DBAPIError as exc:
                if not _missing_table(exc):
                    raise
                if run.on_postgres:
                    run.undo_work()
                ensure_tables(conn, tables, settings.history_schema)
                insert()
            horizon = utc_now() - timedelta(days=settings.history_retention_days)
            conn.execute(sa.delete(tables.runs).where(tables.runs.c.finished_at < horizon))
            conn.execute(sa.delete(tables.snapshots).where(tables.snapshots.c.taken_at < horizon))
            run.commit()
        finally:
            run.rollback()


def _row(outcome: Outcome, host: str | None = None) -> dict[str, Any]:
    return {
        "run_id": outcome.run_id,
        "task": outcome.task,
        "status": outcome.status,
        "dry_run": outcome.dry_run,
        "rows": outcome.rows,
        "cutoff": parse_iso(outcome.cutoff),
        "finished_at": parse_iso(outcome.finished_at) if outcome.finished_at else utc_now(),
        "duration_ms": outcome.duration_ms,
        "exit_code": outcome.exit_code,
        "host": host or socket.gethostname(),
        "error_class": outcome.error_class,
        "error": outcome.error,
    }


def record_run(bind: Connection | Engine | None, settings: CleanupSettings, outcome: Outcome, database: str) -> bool:
    """Write a run's row, with any spooled ones; spool it when the database cannot
    take it (bind None: known unreachable). Never raises: the history is a record of
    the run, never a reason for it to fail."""
    if not settings.history:
        return False
    try:
        row = _row(outcome)
    except Exception as exc:
        _warn_once("history_unavailable", exc)
        return False
    if bind is not None:
        spool = Spool.for_settings(settings)
        claimed = spool.claim(database)
        try:
            _write(bind, settings, rows=[*(entry for _, entry in claimed), row])
            spool.done(path for path, _ in claimed)
            return True
        except Exception as exc:
            spool.release(path for path, _ in claimed)
            _warn_once("history_unavailable", exc)
    _spool(settings, database, row)
    return False


def record_snapshot(engine: Engine, settings: CleanupSettings, taken_at: datetime, snapshot: str) -> bool:
    if not settings.history:
        return False
    try:
        _write(engine, settings, snapshot=(taken_at, snapshot))
        return True
    except Exception as exc:
        _warn_once("history_unavailable", exc)
        return False


def _warn_once(event: str, exc: BaseException) -> None:
    if event not in _warned:
        _warned.add(event)
        failure = classify(exc)
        get_logger().warning(
            event,
            error_class=failure.error_class,
            error=failure.message,
            hint="this run and the next are kept in the state directory until the history can take them "
            "(`skybot-cleanup check` says why; SKYBOT_CLEANUP_HISTORY=false stops trying)",
        )


# -- the local spool --------------------------------------------------------------------------


def state_directory(settings: CleanupSettings | str | None, environ: Mapping[str, str] | None = None) -> Path:
    """SKYBOT_CLEANUP_STATE_DIR (a loaded setting, or its raw value), else systemd's, else the user's."""
    environ = os.environ if environ is None else environ
    configured = settings if isinstance(settings, str) or settings is None else settings.state_dir
    if configured:
        return Path(configured)
    if environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory=; several are ':'-separated
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "skybot-cleanup"


class Spool:
    """Run rows waiting for the database, one JSON file each: atomic to write, and
    claimed by rename so that two runs never record the same row twice. Rows are
    matched to a database by user and database name (not host or port, so a run that
    failed on a wrong port is recorded once the URL is right). Every operation is best
    effort: a state directory that cannot be read is no reason for a run to fail."""

    def __init__(self, directory: Path):
        self.directory = directory

    @classmethod
    def for_settings(cls, settings: CleanupSettings) -> Spool:
        return cls(state_directory(settings) / "pending-runs")

    def add(self, database: str, row: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{row['finished_at']:%Y%m%dT%H%M%S%f}-{row['run_id']}.json"
        temporary = self.directory / f".{name}.tmp"
        temporary.write_text(json.dumps({"database": database, **row}, default=_json_default))
        path = self.directory / name
        temporary.replace(path)
        return path

    def _files(self, pattern: str) -> list[Path]:
        try:
            return sorted(self.directory.glob(pattern)) if self.directory.is_dir() else []
        except OSError:
            return []

    def _reclaim_stale(self) -> None:
        """Claims left by a process that died between claiming and recording."""
        for path in self._files("*.json.claimed-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name.rsplit(".claimed-", 1)[0]))

    def entries(self, database: str) -> list[dict[str, Any]]:
        """The waiting rows of one database, unclaimed (for status and history)."""
        found = []
        for path in self._files("*.json"):
            entry = _parse(path)
            if entry is not None and entry.pop("database") == database:
                found.append(entry)
        return found

    def claim(self, database: str) -> list[tuple[Path, dict[str, Any]]]:
        self._reclaim_stale()
        claimed = []
        for path in self._files("*.json"):
            mine = path.with_name(f"{path.name}.claimed-{os.getpid()}")
            try:
                path.rename(mine)
            except OSError:
                continue  # another run claimed it first
            entry = _parse(mine)
            if entry is None:  # unreadable or malformed: set aside, never retried
                with contextlib.suppress(OSError):
                    mine.rename(path.with_name(f"{path.name}.bad"))
                continue
            if entry.pop("database") != database:
                with contextlib.suppress(OSError):
                    mine.rename(path)
                continue
            claimed.append((mine, entry))
        return claimed

    def done(self, paths: Iterable[Path]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def release(self, paths: Iterable[Path]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                path.rename(path.with_name(path.name.rsplit(".claimed-", 1)[0]))


_SPOOLED_KEYS = (
    "run_id",
    "task",
    "status",
    "dry_run",
    "rows",
    "cutoff",
    "finished_at",
    "duration_ms",
    "exit_code",
    "host",
    "error_class",
    "error",
    "database",
)


def _parse(path: Path) -> dict[str, Any] | None:
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict) or set(entry) != set(_SPOOLED_KEYS):
            return None
        entry["cutoff"], entry["finished_at"] = parse_iso(entry["cutoff"]), parse_iso(entry["finished_at"])
        return entry
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _spool(settings: CleanupSettings, database: str, row: dict[str, Any]) -> None:
    directory = state_directory(settings) / "pending-runs"
    try:
        Spool(directory).add(database, row)
    except OSError as exc:
        if "spool" not in _warned:
            _warned.add("spool")
            get_logger().warning(
                "run_not_recorded",
                error=f"cannot write {directory}: {exc.strerror}",
                hint="set SKYBOT_CLEANUP_STATE_DIR to a writable directory; until then the "
                "logs and the heartbeat are this run's only record",
            )


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return iso_utc(value) or ""
    raise TypeError(type(value).__name__)


# -- reading ----------------------------------------------------------------------------------


@dataclass
class TaskHistory:
    last_success_at: datetime | None = None
    last_success_rows: int | None = None
    last_failure_at: datetime | None = None
    last_failure_status: str | None = None
    last_failure_error: str | None = None

    def add(self, run: dict[str, Any]) -> None:
        """Take a run into account if it is newer than what is known."""
        if run["status"] == "ok":
            if self.last_success_at is None or run["finished_at"] > self.last_success_at:
                self.last_success_at, self.last_success_rows = run["finished_at"], run["rows"]
        elif self.last_failure_at is None or run["finished_at"] > self.last_failure_at:
            self.last_failure_at, self.last_failure_status = run["finished_at"], run["status"]
            self.last_failure_error = f"{run['error_class']}: {run['error']}"

    @property
    def last_status(self) -> str | None:
        """Status of the newest real run: the later of the last success and the last failure."""
        if self.last_failure_at and (not self.last_success_at or self.last_failure_at > self.last_success_at):
            return self.last_failure_status
        return "ok" if self.last_success_at else None


@dataclass(frozen=True)
class HistoryState:
    """What the history knows, for status and metrics."""

    available: bool  # the tables exist and could be read
    first_seen: datetime | None
    tasks: dict[str, TaskHistory]
    last_snapshot_at: datetime | None

    def health(self, name: str, job_schedule: str, now: datetime, grace: timedelta) -> str:
        """The job's health by its recorded runs (schedule.health)."""
        past = self.tasks[name]
        return schedule.health(
            job_schedule,
            last_success=past.last_success_at,
            last_status=past.last_status,
            first_seen=self.first_seen,
            now=now,
            grace=grace,
        )


def _readable(conn: Connection, table: sa.Table) -> bool:
    return db.lookup_table(conn, table.schema, table.name) is not None


def read_state(
    conn: Connection, settings: CleanupSettings, task_names: list[str], spooled: Sequence[dict[str, Any]] = ()
) -> HistoryState:
    """Last success and last failure of each job (dry runs and skips aside), when the
    tool first saw the database, and the newest metrics snapshot. Runs still waiting in
    the local spool count too: a failure the database could not take is still news."""
    found = {name: TaskHistory() for name in task_names}
    available, first_seen, last_snapshot = False, None, None
    if settings.history:
        tables = _tables(conn, settings)
        available = _readable(conn, tables.runs)
    if available:
        runs = tables.runs
        real = sa.and_(runs.c.dry_run.is_(False), runs.c.status.in_(REAL_STATUSES))
        for name in task_names:
            newest = sa.select(runs).where(runs.c.task == name, real).order_by(runs.c.finished_at.desc()).limit(1)
            for row in (
                conn.execute(newest.where(runs.c.status == "ok")).mappings().first(),
                conn.execute(newest.where(runs.c.status != "ok")).mappings().first(),
            ):
                if row:
                    found[name].add(dict(row))
        if _readable(conn, tables.meta):
            value = conn.scalar(sa.select(tables.meta.c.value).where(tables.meta.c.key == "first_seen"))
            first_seen = parse_iso(value) if value else None
        if first_seen is None:  # tables made by a version without `meta`: the oldest record will do
            first_seen = conn.scalar(sa.select(sa.func.min(runs.c.finished_at)))
        last_snapshot = conn.scalar(sa.select(sa.func.max(tables.snapshots.c.taken_at)))
    for entry in spooled:
        if entry["task"] in found and not entry["dry_run"] and entry["status"] in REAL_STATUSES:
            found[entry["task"]].add(entry)
    return HistoryState(available, first_seen, found, last_snapshot)


def ensure_seen(bind: Connection | Engine, settings: CleanupSettings) -> str | None:
    """Record when the tool first saw this database (creating the history tables if need
    be), so that `status` can tell a fresh install from one whose jobs never ran.
    Returns why it could not, or None."""
    try:
        with bind.connect() if isinstance(bind, Engine) else contextlib.nullcontext(bind) as conn:
            run = db.RunConnection(conn, settings, "history")
            run.begin()
            try:
                tables = _tables(conn, settings)
                if not (_readable(conn, tables.runs) and _readable(conn, tables.meta)):
                    ensure_tables(conn, tables, settings.history_schema)
                elif conn.scalar(sa.select(tables.meta.c.value).where(tables.meta.c.key == "first_seen")) is None:
                    conn.execute(tables.meta.insert(), {"key": "first_seen", "value": iso_utc(utc_now())})
                run.commit()
            finally:
                run.rollback()
        return None
    except Exception as exc:
        return classify(exc).message


@dataclass(frozen=True)
class HistoryQuery:
    task: str | None = None
    status: str | None = None  # ok | failed | skipped | interrupted
    since: datetime | None = None
    limit: int = 50


def list_runs(conn: Connection, settings: CleanupSettings, query: HistoryQuery) -> Iterator[dict[str, Any]]:
    """Recorded runs, newest first."""
    runs = _tables(conn, settings).runs
    if not _readable(conn, runs):
        return iter(())
    statement = sa.select(runs).where(*_filters(runs, query)).order_by(runs.c.finished_at.desc(), runs.c.id.desc())
    return iter([dict(row) for row in conn.execute(statement.limit(query.limit)).mappings()])


def summarize(conn: Connection, settings: CleanupSettings, query: HistoryQuery) -> list[dict[str, Any]]:
    """Per task over the window: runs, failures and rows deleted (dry runs aside)."""
    runs = _tables(conn, settings).runs
    if not _readable(conn, runs):
        return []
    real = runs.c.dry_run.is_(False)
    failed = sa.case((sa.and_(real, runs.c.status.in_(["failed", "interrupted"])), 1), else_=0)
    # A failed or interrupted batched run may have committed batches: its rows count.
    deleted = sa.case((real, runs.c.rows), else_=0)
    statement = (
        sa.select(
            runs.c.task,
            sa.func.count().label("runs"),
            sa.func.sum(failed).label("failures"),
            sa.func.sum(deleted).label("rows_deleted"),
            sa.func.max(runs.c.finished_at).label("last"),
        )
        .where(*_filters(runs, query))
        .group_by(runs.c.task)
        .order_by(runs.c.task)
    )
    return [
        {**row, "failures": int(row["failures"] or 0), "rows_deleted": int(row["rows_deleted"] or 0)}
        for row in conn.execute(statement).mappings()
    ]


def _filters(runs: sa.Table, query: HistoryQuery) -> list[sa.ColumnElement[bool]]:
    filters: list[sa.ColumnElement[bool]] = []
    if query.task:
        filters.append(runs.c.task == query.task)
    if query.status:
        filters.append(runs.c.status == query.status)
    if query.since:
        filters.append(runs.c.finished_at >= query.since)
    return filters
