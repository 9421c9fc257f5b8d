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
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from skybot_cleanup import db, schedule, trust
from skybot_cleanup.clock import iso_utc, parse_iso, utc_now
from skybot_cleanup.errors import ConfigError, SqlState, classify, sqlstate_of
from skybot_cleanup.logs import get_logger
from skybot_cleanup.results import RunResult
from skybot_cleanup.settings import Settings
from skybot_cleanup.spool import Spool
from skybot_cleanup.vocabulary import REAL_STATUSES, Health, RunStatus

_warned: set[str] = set()


def reset() -> None:
    """Warn again (a new command in the same process)."""
    _warned.clear()


# A run's history row: its result's fields of these names, plus the host it ran on.
# Rows (and spool entries) of earlier versions lack the ADDED_COLUMNS.
ADDED_COLUMNS = (
    "batches",
    "remaining",
    "remaining_exact",
    "stopped_by",
    "clock_skew_s",
    "reconnects",
    "unconfirmed_rows",
    "warnings",
    "replica_wait_s",
    "version",
)
RESULT_COLUMNS = (
    "run_id",
    "task",
    "status",
    "dry_run",
    "rows",
    "cutoff",
    "finished_at",
    "duration_ms",
    "exit_code",
    "error_class",
    "error",
    *ADDED_COLUMNS,
)
TIMESTAMP_COLUMNS = ("cutoff", "finished_at")
ROW_COLUMNS = (*RESULT_COLUMNS, "host")


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
        sa.Column("batches", sa.Integer),
        sa.Column("remaining", sa.BigInteger),
        sa.Column("remaining_exact", sa.Boolean),
        sa.Column("stopped_by", sa.Text),
        sa.Column("clock_skew_s", sa.Float),
        sa.Column("reconnects", sa.Integer),
        sa.Column("unconfirmed_rows", sa.BigInteger),
        sa.Column("warnings", sa.Text),  # "; "-separated
        sa.Column("replica_wait_s", sa.Float),
        sa.Column("version", sa.Text),  # the release that recorded the run
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


def _tables(conn: Connection, settings: Settings) -> HistoryTables:
    return history_tables(conn.dialect.name, settings.history_schema)


# -- the row ------------------------------------------------------------------------------------


def history_row(result: RunResult, host: str | None = None) -> dict[str, Any]:
    """The one mapping from a run's result to its history row (and spool entry)."""
    row: dict[str, Any] = {name: getattr(result, name) for name in RESULT_COLUMNS}
    for name in TIMESTAMP_COLUMNS:
        row[name] = parse_iso(row[name]) if row[name] else utc_now()
    row["warnings"] = "; ".join(result.warnings) if result.warnings else None
    row["host"] = host or socket.gethostname()
    return row


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON can hold it (the spool's form)."""
    return {name: iso_utc(row[name]) if name in TIMESTAMP_COLUMNS else row[name] for name in ROW_COLUMNS}


def _decode(entry: dict[str, Any]) -> dict[str, Any] | None:
    """A spool entry back into a row, or None when it is not one the tool wrote. Fields a
    later release added are left out (that release writes where this one never reads, but
    an entry that reaches it anyway loses only them)."""
    if not set(ROW_COLUMNS) - set(ADDED_COLUMNS) <= set(entry):
        return None
    try:
        return {name: parse_iso(entry[name]) if name in TIMESTAMP_COLUMNS else entry.get(name) for name in ROW_COLUMNS}
    except (ValueError, TypeError, AttributeError):
        return None


def spool_for(state_dir: str | None) -> Spool:
    """This host's spool of run rows, in the state directory (a setting, or its raw value)."""
    return Spool.in_state_directory(state_dir, _decode)


def spool_row(spool: Spool, database: str, row: dict[str, Any]) -> None:
    """Raises OSError when the state directory cannot take it."""
    spool.add(database, f"{row['finished_at']:%Y%m%dT%H%M%S%f}-{row['run_id']}", _encode(row))


# -- writing ----------------------------------------------------------------------------------

_DDL_LOCK = "history-ddl"


# Another of the tool's processes may be creating the tables: waiting for it is waiting
# for no app row, so this wait may be longer than the run's lock_timeout.
DDL_LOCK_WAIT = "10s"


def _wait_for_ddl_lock(conn: Connection) -> None:
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{DDL_LOCK_WAIT}'")
    conn.execute(
        sa.text("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(:key, 0::bigint))"),
        {"key": db.lock_key(_DDL_LOCK)},
    )


def ensure_tables(conn: Connection, tables: HistoryTables, schema: str, owner: str | None = None) -> None:
    """Create what is missing, serialised across processes; needs no database CREATE
    privilege when the schema exists (CREATE SCHEMA IF NOT EXISTS would). A schema that
    exists must be this role's own (or `owner`'s, the one the operator names): one another
    role made before the tool's first run could hold its tables' code."""
    if conn.dialect.name == "postgresql":
        _wait_for_ddl_lock(conn)
        found = conn.execute(SCHEMA_OWNER, {"name": schema}).one_or_none()
        if found is None:
            conn.execute(sa.schema.CreateSchema(schema))
        elif found.owner not in (found.role, owner):
            raise ConfigError(trust.history_owner_problem(f'schema "{schema}"', found.owner, found.role))
    tables.runs.metadata.create_all(conn, checkfirst=True)
    seen = sa.select(tables.meta.c.key).where(tables.meta.c.key == "first_seen")
    if conn.scalar(seen) is None:
        conn.execute(tables.meta.insert(), {"key": "first_seen", "value": _server_now_iso(conn)})


SCHEMA_OWNER = sa.text("""
    SELECT r.rolname AS owner, CURRENT_USER::text AS role FROM pg_catalog.pg_namespace n
    JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner WHERE n.nspname = :name
""")


def _server_now_iso(conn: Connection) -> str:
    """Now by the database server's clock (the history's), as the meta table keeps it."""
    if conn.dialect.name != "postgresql":
        return iso_utc(utc_now()) or ""
    return iso_utc(conn.scalar(sa.select(SERVER_NOW))) or ""


def _missing_table(exc: BaseException) -> bool:
    return sqlstate_of(exc) in (SqlState.UNDEFINED_TABLE, SqlState.INVALID_SCHEMA_NAME) or "no such table" in str(
        getattr(exc, "orig", exc)
    )


def _missing_column(exc: BaseException) -> bool:
    return sqlstate_of(exc) == SqlState.UNDEFINED_COLUMN or "has no column named" in str(getattr(exc, "orig", exc))


def upgrade_runs_table(conn: Connection, tables: HistoryTables) -> set[str]:
    """Add the columns a runs table made by an earlier version lacks, if this role may
    (it made the table, or owns it); the columns the table has afterwards."""
    runs = tables.runs
    info = db.lookup_table(conn, runs.schema, runs.name)
    known = set(info.columns) if info else set()
    missing = [column for column in runs.columns if column.name not in known]
    if not missing:
        return known
    on_postgres = conn.dialect.name == "postgresql"
    if on_postgres:
        _wait_for_ddl_lock(conn)
    table = db.qualified(runs.schema, runs.name)
    try:
        with db.savepoint(conn, "upgrade"):
            for column in missing:
                ddl = f'ALTER TABLE {table} ADD COLUMN {"IF NOT EXISTS " if on_postgres else ""}"{column.name}" '
                conn.exec_driver_sql(ddl + column.type.compile(dialect=conn.dialect))
    except sa.exc.DBAPIError as exc:  # not the table's owner: keep writing what it has
        _warn_once("history_columns_missing", exc)
        return known
    return known | {column.name for column in missing}


# The database server's clock, as UTC like the columns: what every history timestamp is
# bounded by and pruned against, so that no host clock can date a row in the future or
# prune the history (the host's clock may be anything; the server's is the app's).
SERVER_NOW = sa.func.pg_catalog.timezone("UTC", sa.func.pg_catalog.clock_timestamp())


def _statements(
    conn: Connection,
    settings: Settings,
    tables: HistoryTables,
    rows: Sequence[dict[str, Any]],
    snapshot: tuple[datetime, str] | None,
    columns: set[str] | None = None,
) -> list[sa.Insert | sa.Delete | sa.Select[Any]]:
    """The inserts and the pruning of one write: one statement per row, so that each
    can be bounded by the server's clock; last, the newest success of the last row's job
    (what its textfile shows when that run did not succeed)."""
    runs, snapshots = tables.runs, tables.snapshots
    on_postgres = conn.dialect.name == "postgresql"
    now: sa.ColumnElement[datetime] = SERVER_NOW if on_postgres else sa.literal(utc_now())
    statements: list[sa.Insert | sa.Delete | sa.Select[Any]] = []
    for row in rows:
        kept = {name: value for name, value in row.items() if columns is None or name in columns}
        if on_postgres:  # never in the future of the server's clock
            kept["finished_at"] = sa.func.least(sa.literal(kept["finished_at"], sa.DateTime), now)
        statements.append(runs.insert().values(kept))
    if snapshot:
        taken_at = sa.func.least(sa.literal(snapshot[0], sa.DateTime), now) if on_postgres else snapshot[0]
        statements.append(snapshots.insert().values(taken_at=taken_at, host=socket.gethostname(), snapshot=snapshot[1]))
    retention = timedelta(days=settings.history_retention_days)
    horizon = now - sa.literal(retention, sa.Interval) if on_postgres else sa.literal(utc_now() - retention)
    statements.append(sa.delete(runs).where(runs.c.finished_at < horizon))
    statements.append(sa.delete(snapshots).where(snapshots.c.taken_at < horizon))
    if rows:
        newest = sa.and_(runs.c.task == rows[-1]["task"], runs.c.status == RunStatus.OK, runs.c.dry_run.is_(False))
        statements.append(sa.select(sa.func.max(runs.c.finished_at)).where(newest))
    return statements


def _write(
    bind: Connection | Engine,
    settings: Settings,
    rows: Sequence[dict[str, Any]] = (),
    snapshot: tuple[datetime, str] | None = None,
) -> datetime | None:
    """Through the run's own connection when it has one (no second connect), else a new
    one. On PostgreSQL the whole transaction goes in one round trip; only when the tables
    are missing or lack a column does it take more (to create or upgrade them)."""
    with bind.connect() if isinstance(bind, Engine) else contextlib.nullcontext(bind) as conn:
        run = db.RunConnection(conn, settings.session(), "history")
        tables = _tables(conn, settings)
        if run.on_postgres:
            try:
                answers = db.transaction_in_one_round_trip(run, _statements(conn, settings, tables, rows, snapshot))
                return _newest_success(answers, rows)
            except Exception as exc:
                if not (_missing_table(exc) or _missing_column(exc)):
                    raise
        run.begin()
        try:
            try:
                answers = _execute(conn, _statements(conn, settings, tables, rows, snapshot))
            except sa.exc.DBAPIError as exc:
                if not (_missing_table(exc) or _missing_column(exc)):
                    raise
                if run.on_postgres:
                    run.undo_work()
                ensure_tables(conn, tables, settings.history_schema, settings.history_owner)
                columns = upgrade_runs_table(conn, tables)
                answers = _execute(conn, _statements(conn, settings, tables, rows, snapshot, columns))
            run.commit()
            return _newest_success(answers, rows)
        finally:
            run.rollback()


def _execute(conn: Connection, statements: Sequence[sa.Insert | sa.Delete | sa.Select[Any]]) -> list[Any]:
    return [
        conn.execute(statement).all() if isinstance(statement, sa.Select) else conn.execute(statement).rowcount
        for statement in statements
    ]


def _newest_success(answers: list[Any], rows: Sequence[dict[str, Any]]) -> datetime | None:
    return answers[-1][0][0] if rows and answers and answers[-1] else None


def record_run(
    bind: Connection | Engine | None,
    settings: Settings,
    result: RunResult,
    database: str,
    snapshot: tuple[datetime, str] | None = None,
) -> bool:
    """Write a run's row (and the metrics job's snapshot), with any spooled rows; spool
    the run's row when the database cannot take it (bind None: known unreachable). Never
    raises: the history is a record of the run, never a reason for it to fail."""
    if not settings.history:
        return False
    try:
        row = history_row(result)
    except Exception as exc:
        _warn_once("history_unavailable", exc)
        return False
    spool = spool_for(settings.state_dir)
    if bind is not None:
        claimed = spool.claim(database)
        try:
            newest = _write(bind, settings, rows=[*(entry for _, entry in claimed), row], snapshot=snapshot)
            spool.done(path for path, _ in claimed)
            result.last_success_at = iso_utc(newest)
            return True
        except Exception as exc:
            spool.release(path for path, _ in claimed)
            _warn_once("history_unavailable", exc)
    try:
        spool_row(spool, database, row)
    except OSError as exc:
        if "spool" not in _warned:
            _warned.add("spool")
            get_logger().warning(
                "run_not_recorded",
                error=f"cannot write {spool.directory}: {exc.strerror}",
                hint="set SKYBOT_CLEANUP_STATE_DIR to a writable directory; until then the "
                "logs and the heartbeat are this run's only record",
            )
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
        if run["status"] == RunStatus.OK:
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
        return RunStatus.OK if self.last_success_at else None


@dataclass(frozen=True)
class HistoryState:
    """What the history knows, for status and metrics."""

    available: bool  # the tables exist and could be read
    first_seen: datetime | None
    tasks: dict[str, TaskHistory]
    last_snapshot_at: datetime | None

    def health(self, name: str, job_schedule: str, now: datetime, grace: timedelta) -> Health:
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


def wanted(tables: HistoryTables) -> list[tuple[str | None, str]]:
    """The history's tables as db.lookup_tables takes them: runs, meta, snapshots."""
    return [(table.schema, table.name) for table in (tables.runs, tables.meta, tables.snapshots)]


# The columns the health of a job is judged by: every release's runs table has them.
_JUDGED = ("task", "status", "finished_at", "rows", "error_class", "error")


class StateReading:
    """The reads that make a HistoryState, added to a db.Reads (one round trip with the
    rest of a report); `state()` once they have run. `found`: the history's tables as
    db.lookup_tables found them (wanted's order); a table an earlier release did not make
    is read around, never an error."""

    def __init__(
        self,
        reads: db.Reads,
        tables: HistoryTables,
        found: Sequence[db.TableInfo | BaseException | None],
        task_names: Sequence[str],
        spooled: Sequence[dict[str, Any]] = (),
    ):
        self.task_names, self.spooled = task_names, spooled
        runs_info, meta_info, snapshots_info = (info if isinstance(info, db.TableInfo) else None for info in found)
        self.available = runs_info is not None
        runs = tables.runs
        self.newest = self.first_seen = self.oldest = self.last_snapshot = None
        if runs_info is not None:
            real = sa.and_(runs.c.dry_run.is_(False), runs.c.status.in_(REAL_STATUSES))
            outcomes = (runs.c.status == RunStatus.OK, runs.c.status != RunStatus.OK)
            newest = [
                sa.select(*(runs.c[name] for name in _JUDGED))
                .where(runs.c.task == name, real, outcome)
                .order_by(runs.c.finished_at.desc())
                .limit(1)
                .subquery()
                .select()
                for name in task_names
                for outcome in outcomes
            ]
            self.newest = reads.add(sa.union_all(*newest))
            # Tables made by a release without `meta`: the oldest record will do.
            self.oldest = reads.add(sa.select(sa.func.min(runs.c.finished_at)))
        if meta_info is not None:
            self.first_seen = reads.add(sa.select(tables.meta.c.value).where(tables.meta.c.key == "first_seen"))
        if snapshots_info is not None:
            self.last_snapshot = reads.add(sa.select(sa.func.max(tables.snapshots.c.taken_at)))

    def state(self) -> HistoryState:
        found = {name: TaskHistory() for name in self.task_names}
        available = self.available and self.newest is not None and self.newest.error is None
        first_seen = None
        if available and self.newest is not None:
            for row in self.newest.rows:
                found[row[0]].add(dict(zip(_JUDGED, row, strict=True)))
            value = self.first_seen.scalar() if self.first_seen is not None else None
            first_seen = parse_iso(value) if value else (self.oldest.scalar() if self.oldest is not None else None)
        last_snapshot = self.last_snapshot.scalar() if self.last_snapshot is not None else None
        for entry in self.spooled:
            if entry["task"] in found and not entry["dry_run"] and entry["status"] in REAL_STATUSES:
                found[entry["task"]].add(entry)
        return HistoryState(available, first_seen, found, last_snapshot)


def ensure_seen(bind: Connection | Engine, settings: Settings) -> str | None:
    """Record when the tool first saw this database (creating the history tables if need
    be), so that `status` can tell a fresh install from one whose jobs never ran.
    Returns why it could not, or None."""
    try:
        with bind.connect() if isinstance(bind, Engine) else contextlib.nullcontext(bind) as conn:
            run = db.RunConnection(conn, settings.session(), "history")
            run.begin()
            try:
                tables = _tables(conn, settings)
                if not (_readable(conn, tables.runs) and _readable(conn, tables.meta)):
                    ensure_tables(conn, tables, settings.history_schema, settings.history_owner)
                elif conn.scalar(sa.select(tables.meta.c.value).where(tables.meta.c.key == "first_seen")) is None:
                    conn.execute(tables.meta.insert(), {"key": "first_seen", "value": _server_now_iso(conn)})
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
    until: datetime | None = None
    limit: int = 50


def list_runs(conn: Connection, settings: Settings, query: HistoryQuery) -> Iterator[dict[str, Any]]:
    """Recorded runs, newest first; the columns a table of an earlier release lacks are
    read as empty."""
    runs = _tables(conn, settings).runs
    info = db.lookup_table(conn, runs.schema, runs.name)
    if info is None:
        return iter(())
    present = [column for column in runs.columns if column.name in info.columns]
    statement = sa.select(*present).where(*_filters(runs, query)).order_by(runs.c.finished_at.desc(), runs.c.id.desc())
    absent = {column.name: None for column in runs.columns if column.name not in info.columns}
    return iter([absent | dict(row) for row in conn.execute(statement.limit(query.limit)).mappings()])


def summarize(conn: Connection, settings: Settings, query: HistoryQuery) -> list[dict[str, Any]]:
    """Per task over the window: runs, failures and rows deleted (dry runs aside)."""
    runs = _tables(conn, settings).runs
    if not _readable(conn, runs):
        return []
    real = runs.c.dry_run.is_(False)
    failed = sa.case((sa.and_(real, runs.c.status.in_([RunStatus.FAILED, RunStatus.INTERRUPTED])), 1), else_=0)
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
    if query.until:
        filters.append(runs.c.finished_at < query.until)
    return filters
