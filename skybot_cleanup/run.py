"""A cleanup run: one task, one cutoff, one connection at a time, batch by batch; the
library API behind every cleanup command.

A batched run picks its walk (skybot_cleanup.walks) from what is due, in its first
transaction: the index walk when fewer rows are due than an eighth of the table's pages,
the heap walk otherwise (and always for a task whose predicate no index serves, and for a
table with inheritance children, whose indexes are their own). Between batches it keeps
to its caps (--max-rows, --max-runtime) and its pace (--sleep-ms, and the standbys' replay
lag: skybot_cleanup.pacing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from skybot_cleanup import db, history, trust
from skybot_cleanup.clock import iso_utc
from skybot_cleanup.cutoff import RunTime, cutoff, run_time
from skybot_cleanup.errors import ConfigError, SqlState, is_connection_failure, sqlstate_of
from skybot_cleanup.pacing import Pace
from skybot_cleanup.recording import RecordedRun
from skybot_cleanup.registry import Task
from skybot_cleanup.results import RunResult
from skybot_cleanup.retry import with_retries
from skybot_cleanup.settings import Settings
from skybot_cleanup.vocabulary import StopReason
from skybot_cleanup.walks import Walk, choose_walk, delete_in_one_statement

PROGRESS_LOG_INTERVAL_S = 5.0
# `remaining` is counted up to this many rows (a lower bound past it), and never in
# more than this share of the run's time cap.
REMAINING_COUNT_CAP = 1_000_000
REMAINING_AFTER_MAX_RUNTIME_CAP = 10_000

ProgressCallback = Callable[[int, int | None], None]  # (rows done, estimated total)


@dataclass
class Tally:
    """What a run has committed and met, for its report: kept across reconnects, unlike
    a walk's cursor."""

    rows: int = 0
    batches: int = 0
    longest_batch_ms: float = 0.0
    rows_on_connection: int = 0  # committed on the current connection
    remaining: int | None = None
    remaining_exact: bool | None = None
    stopped_by: StopReason | None = None
    estimated_total: int | None = None
    last_log: float = field(default_factory=time.monotonic)

    def add_batch(self, deleted: int, started: float) -> None:
        """A batch committed (its time taken from time.monotonic() `started`)."""
        self.rows += deleted
        self.rows_on_connection += deleted
        self.batches += 1
        self.longest_batch_ms = max(self.longest_batch_ms, (time.monotonic() - started) * 1000)

    def report(self, on_progress: ProgressCallback | None, clock_started: float, log: Any) -> None:
        """The progress bar, and a `progress` log event at most every PROGRESS_LOG_INTERVAL_S."""
        if on_progress is not None:
            on_progress(self.rows, self.estimated_total)
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_LOG_INTERVAL_S:
            self.last_log = now
            elapsed = now - clock_started
            rate = round(self.rows / elapsed) if elapsed else None
            log.info("progress", rows=self.rows, batches=self.batches, rows_per_s=rate)


@dataclass
class Connections:
    """The connections a run opened. Rows committed on one it lost are confirmed once a new
    one finds the same server still running (a backend an admin killed), unconfirmed
    otherwise: a failover may have lost them, and the walk after it deletes them again if
    so, so the result counts them apart from `rows`."""

    opened: int = 0
    lost_rows: int = 0  # committed on lost connections, not yet confirmed or not
    unconfirmed_rows: int = 0
    server_started: datetime | None = None  # the server's pg_postmaster_start_time()

    @property
    def reconnects(self) -> int:
        return max(0, self.opened - 1)

    @property
    def unconfirmed(self) -> int:
        """Not confirmed: on a lost server, or still waiting for a new connection."""
        return self.unconfirmed_rows + self.lost_rows

    def confirm(self, run: db.RunConnection, log: Any) -> None:
        """A connection's first transaction: are the rows the lost ones committed still there?"""
        if self.reconnects:
            if self.lost_rows and run.server_started != self.server_started:
                self.unconfirmed_rows += self.lost_rows
            self.lost_rows = 0
            log.warning("reconnected", reconnects=self.reconnects, unconfirmed_rows=self.unconfirmed_rows)
        self.server_started = run.server_started


def run_task(
    settings: Settings,
    task: Task,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    run_id: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunResult:
    """Run one task and report what happened; expected failures and signals become
    the result's status and exit code instead of exceptions."""
    return Run(settings, task, dry_run=dry_run, now=now, run_id=run_id, on_progress=on_progress).execute()


class Run:
    """One run of one task: its cutoff, connection, walk, tally and result."""

    def __init__(
        self,
        settings: Settings,
        task: Task,
        *,
        dry_run: bool = False,
        now: datetime | None = None,
        run_id: str | None = None,
        on_progress: ProgressCallback | None = None,
    ):
        self.settings = settings
        self.task = task
        self.dry_run = dry_run
        self.host_now = now  # a fixed host clock (the demo, tests); else the host's own
        self.recorded = RecordedRun(settings, task.name, dry_run=dry_run, run_id=run_id, started_at=now)
        # The run's one now and cutoff, from its first transaction: every batch and every
        # retry reuses them, so a row whose expiry the app extends mid-run is never deleted.
        self.time: RunTime | None = None
        self.cutoff: datetime | None = None
        self.batched = not dry_run and not settings.single_transaction
        # --max-runtime: no statement outlives `deadline`; no batch starts after
        # `work_deadline`, which leaves a tenth of the time (at most a second) to count
        # what is left and record the run.
        self.deadline = self.work_deadline = None
        if settings.max_runtime_s:
            self.deadline = self.recorded.clock_started + settings.max_runtime_s
            self.work_deadline = self.deadline - min(1.0, settings.max_runtime_s / 10)
        self.on_progress = on_progress
        self.tally = Tally()
        self.pace = Pace(settings.sleep_ms, settings.max_replica_lag_s, self._out_of_time, self.recorded.log)
        self.connections = Connections()
        self.warnings: list[str] = []
        self.excluded: set[str] = set()  # single-transaction mode: rows a race made it leave out
        self.warned_beyond_need = False
        self.log = self.recorded.log

    def execute(self) -> RunResult:
        return self.recorded.execute(lambda: with_retries(self.settings, self._attempt, log=self.log), self._details)

    def _details(self) -> dict[str, Any]:
        tally, deleting = self.tally, not self.dry_run
        return {
            # After a failover, rows committed on the lost connection may be lost with it:
            # the walk after the reconnect deletes them again and counts them then.
            "rows": tally.rows - self.connections.unconfirmed,
            "cutoff": self.cutoff,
            "batches": tally.batches if self.batched else None,
            "remaining": tally.remaining if deleting else None,
            "remaining_exact": tally.remaining_exact if deleting else None,
            "stopped_by": tally.stopped_by,
            "longest_batch_ms": round(tally.longest_batch_ms) if self.batched else None,
            "replica_wait_s": round(self.pace.waited_s, 3) if self.batched and self.pace.pacer else None,
            "clock_skew_s": self.time.skew_s if self.time else None,
            "reconnects": self.connections.reconnects or None,
            "unconfirmed_rows": self.connections.unconfirmed or None,
            "warnings": [*self.warnings, *self.pace.warnings] or None,
        }

    # -- one attempt --------------------------------------------------------------------------

    def _attempt(self) -> None:
        """One connection, one chain of transactions. Idempotent: a retry after any
        failure makes a new walk from the start of the due rows, under the same cutoff: a
        position in a walk means nothing on another connection (after a failover, on
        another server)."""
        recorded = self.recorded
        assert recorded.engine is not None and recorded.target is not None
        conn = recorded.conn = recorded.engine.connect()
        self.connections.opened += 1
        run = db.RunConnection(
            conn,
            self.settings.session(),
            self.task.name,
            lock=None if self.dry_run else self.task.name,
            read_only=self.dry_run,
            deadline=self.deadline,
            # The first transaction counts what is due through the walk column's index.
            planner=db.INDEX_WALK_PLANNER if self.batched else None,
            watch_standbys=self.batched and self.pace.pacer is not None,
        )
        try:
            self._work(run)
        except BaseException as exc:
            # A retry starts on a new connection; this one may be broken. What it committed
            # is unconfirmed when it was lost: the server may have lost it too (a failover).
            if is_connection_failure(exc):
                self.connections.lost_rows += self.tally.rows_on_connection
            self.tally.rows_on_connection = 0
            run.rollback()
            recorded.close_connection()
            if not (sqlstate_of(exc) == SqlState.QUERY_CANCELED and self._out_of_time()):
                raise
            self.tally.stopped_by = StopReason.MAX_RUNTIME  # the cap came before the run could start its walk

    def _work(self, run: db.RunConnection) -> None:
        recorded, conn = self.recorded, run.conn
        assert recorded.target is not None
        run.begin()
        self.connections.confirm(run, self.log)
        cutoff = self._cutoff(run)
        table = self._bind(run)
        self._warn_of_row_level_security(table)
        due = self.task.due(table.columns, cutoff)
        if self.dry_run:
            self.tally.rows = int(conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(due)) or 0)
        elif not self.batched:
            self._single_transaction(run, table, due)
        else:
            self._batches(run, table, due)
        run.commit()
        if not (self.batched or self.dry_run) and run.on_postgres:  # held rows are counted as it commits
            self.tally.remaining = run.held_in_last_transaction + len(self.excluded)
            self.tally.remaining_exact = True

    def _bind(self, run: db.RunConnection) -> db.BoundTable:
        """The task's table, checked (bind_checked); what the role holds beyond a
        cleanup's needs, logged once per run."""
        schema = self.recorded.target.schema if self.recorded.target else None
        table, refused = bind_checked(run, self.settings, self.task, schema, deleting=not self.dry_run)
        if refused:
            self.recorded.history_refused = refused  # the run's record waits in the spool meanwhile
            raise ConfigError(refused)
        beyond = trust.beyond_need(table.info, table.shown) if run.on_postgres else []
        if beyond and not self.warned_beyond_need:
            self.warned_beyond_need = True
            self.log.warning(
                "privileges_beyond_need",
                role=table.info.role,
                beyond=beyond,
                hint="a cleanup needs SELECT and DELETE on its tables and its own history schema; "
                "`skybot-cleanup check` prints the statements that make such a role",
            )
        return table

    def _cutoff(self, run: db.RunConnection) -> datetime:
        """The first transaction reads the server's clock: the run's now is the earlier
        of the two clocks, so a row is deleted only once it has expired by both."""
        if self.cutoff is not None:
            return self.cutoff
        self.recorded.read_clocks(run)
        self.time = run_time(server=run.server_now, host=self.host_now or run.host_now)
        self.cutoff = cutoff(self.task, self.time.now, self.settings)
        skew = self.time.skew_s
        if skew is not None and abs(skew) > self.settings.clock_skew_warning_s:
            self.log.warning(
                "clock_skew",
                host_clock=iso_utc(self.time.host),
                server_clock=iso_utc(self.time.server),
                skew_s=skew,
                hint="this host's clock and the database server's disagree: the run takes the earlier, so nothing "
                "valid is deleted, but fix the clock (NTP) so that due rows are not kept longer",
            )
        return self.cutoff

    def _warn_of_row_level_security(self, table: db.BoundTable) -> None:
        warning = table.info.rls_warning
        if warning and warning not in self.warnings:
            self.warnings.append(warning)
            self.log.warning("row_level_security", table=table.shown, warning=warning)

    # -- single-transaction mode --------------------------------------------------------------

    def _single_transaction(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> None:
        tally, self.excluded = self.tally, set()  # this attempt's: a ctid means nothing on another connection
        tally.rows = delete_in_one_statement(run, table, due, self.excluded)
        if not run.on_postgres:
            tally.remaining, tally.remaining_exact = 0, True

    # -- batches ------------------------------------------------------------------------------

    def _batches(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> None:
        """Delete in short committed batches along a new walk. The tally moves only once a
        batch has committed, so a retry after a lost commit redoes that batch."""
        tally = self.tally
        if self.on_progress is not None and tally.estimated_total is None:
            tally.estimated_total = tally.rows + _estimate(run.conn, table, due)
        walk = choose_walk(run, table, due, self.task.walk_column, self.settings.batch_size, self.log)
        if walk is None:  # nothing due (held rows included): no walk, and nothing to count again
            tally.remaining, tally.remaining_exact = 0, True
            return
        run.commit_and_continue(planner=walk.planner)
        self._walk(run, walk)  # to its end, or to a cap
        cap = REMAINING_COUNT_CAP
        if tally.stopped_by is StopReason.MAX_RUNTIME:
            cap = max(10 * self.settings.batch_size, REMAINING_AFTER_MAX_RUNTIME_CAP)
        try:
            left = walk.remaining(cap)
            tally.remaining, tally.remaining_exact = left.rows, left.exact
        except sa.exc.OperationalError as exc:
            if sqlstate_of(exc) != SqlState.QUERY_CANCELED:
                raise
            run.undo_work()  # out of time: what the walk knows for certain, as a lower bound
            tally.remaining, tally.remaining_exact = walk.known_left(), False

    def _walk(self, run: db.RunConnection, walk: Walk) -> None:
        """Batches until the walk ends or a cap stops it."""
        settings, tally = self.settings, self.tally
        while not walk.ended:
            limit = settings.batch_size
            if settings.max_rows is not None:
                limit = min(limit, settings.max_rows - tally.rows)
                if limit <= 0:  # reached by an earlier attempt of this run
                    tally.stopped_by = StopReason.MAX_ROWS
                    return
            if self._out_of_time():
                tally.stopped_by = StopReason.MAX_RUNTIME
                return
            started = time.monotonic()
            try:
                deleted = walk.batch(limit)
            except sa.exc.OperationalError as exc:
                if not (sqlstate_of(exc) == SqlState.QUERY_CANCELED and self._out_of_time()):
                    raise
                run.undo_work()  # the batch met the end of --max-runtime: stop, keep what committed
                tally.stopped_by = StopReason.MAX_RUNTIME
                return
            run.commit_and_continue()
            held = run.held_in_last_transaction
            if held:
                self.log.info("held_rows_left", rows=held, batch=tally.batches + 1)
            walk.committed(held)
            tally.add_batch(deleted, started)
            tally.report(self.on_progress, self.recorded.clock_started, self.log)
            if walk.ended:
                return
            if settings.max_rows is not None and tally.rows >= settings.max_rows:
                tally.stopped_by = StopReason.MAX_ROWS
                return
            tally.stopped_by = self.pace.between_batches(run)
            if tally.stopped_by is not None:
                return

    def _out_of_time(self, after_s: float = 0.0) -> bool:
        """No batch may start now (or, after a pause of `after_s`)."""
        return self.work_deadline is not None and time.monotonic() + after_s >= self.work_deadline


def bind_checked(
    run: db.RunConnection, settings: Settings, task: Task, schema: str | None, *, deleting: bool
) -> tuple[db.BoundTable, str | None]:
    """The task's table, looked up with the history's in one query, and everything that
    must be true of them before a row is deleted: the privileges the run needs (missing:
    an error on every run, not only once a row is due) and no other role's code that
    would run with this role's privileges (each a ConfigError); and why the history may
    not be used, if so (trust.history_problem)."""
    names = settings.table_names(task.table)
    history_tables = history.history_tables(run.conn.dialect.name, settings.history_schema)
    watched = run.on_postgres and settings.history
    found = db.lookup_tables(run.conn, [(schema, names.table), *(history.wanted(history_tables) if watched else [])])
    table = db.bind(schema, task.table, names, found[0])
    if isinstance(table, ConfigError):
        raise table
    if not run.on_postgres:
        return table, None
    problem = trust.privilege_problem(task, table, deleting=deleting) or (
        trust.code_problem(table, settings.trusted_code) if deleting else None
    )
    if problem:
        raise ConfigError(problem)
    refused = trust.history_problem(found[1:], settings.history_owner, settings.trusted_code) if watched else None
    return table, refused


def _estimate(conn: sa.Connection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> int:
    """Due rows for a progress bar: the planner's estimate on PostgreSQL (no scan)."""
    if conn.dialect.name == "postgresql":
        return db.estimate_rows(conn, table, due)
    return int(conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(due)) or 0)
