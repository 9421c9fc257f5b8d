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
from skybot_cleanup.errors import ConfigError, RowsTakenMidStatement, SqlState, is_connection_failure, sqlstate_of
from skybot_cleanup.pacing import POLL_S, ReplicaPacer
from skybot_cleanup.recording import RecordedRun
from skybot_cleanup.registry import Task
from skybot_cleanup.results import RunResult
from skybot_cleanup.retry import with_retries
from skybot_cleanup.settings import Settings
from skybot_cleanup.vocabulary import StopReason
from skybot_cleanup.walks import RACE_RETRIES, HeapWalk, IndexWalk, RowidWalk, Walk, WalkKind, note_race

PROGRESS_LOG_INTERVAL_S = 5.0
# While waiting for the standbys, a line in the log this often.
WAIT_LOG_INTERVAL_S = 30.0
# The index walk while fewer rows are due than this share of the table's pages; the heap
# walk past it (docs/benchmarks.md: where each is faster, by layout).
INDEX_WALK_SHARE_OF_PAGES = 1 / 8
# `remaining` is counted up to this many rows (a lower bound past it), and never in
# more than this share of the run's time cap.
REMAINING_COUNT_CAP = 1_000_000
REMAINING_AFTER_MAX_RUNTIME_CAP = 10_000

ProgressCallback = Callable[[int, int | None], None]  # (rows done, estimated total)
STANDBYS_INVISIBLE = (
    "this role cannot read the streaming standbys' replay positions, so the run cannot keep their lag under "
    "SKYBOT_CLEANUP_MAX_REPLICA_LAG_S"
)


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
    replica_wait_s: float = 0.0
    last_log: float = field(default_factory=time.monotonic)


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
        self.pacer = ReplicaPacer(settings.max_replica_lag_s) if self.batched and settings.max_replica_lag_s else None
        self.connected = False  # a connection of this run has been open (so a new one replaces it)
        self.reconnects = 0
        # Rows committed on connections the run lost: confirmed once a new connection finds
        # the same server still running (a killed backend), unconfirmed otherwise (a
        # failover may have lost them; the walk after it deletes them again if so).
        self.lost_rows = 0
        self.server_started: datetime | None = None
        self.unconfirmed_rows = 0
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
            "rows": tally.rows - self.unconfirmed_rows - self.lost_rows,
            "cutoff": self.cutoff,
            "batches": tally.batches if self.batched else None,
            "remaining": tally.remaining if deleting else None,
            "remaining_exact": tally.remaining_exact if deleting else None,
            "stopped_by": tally.stopped_by,
            "longest_batch_ms": round(tally.longest_batch_ms) if self.batched else None,
            "replica_wait_s": round(tally.replica_wait_s, 3) if self.pacer is not None else None,
            "clock_skew_s": self.time.skew_s if self.time else None,
            "reconnects": self.reconnects or None,
            "unconfirmed_rows": (self.unconfirmed_rows + self.lost_rows) or None,
            "warnings": self.warnings or None,
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
        if self.connected:
            self.reconnects += 1
        self.connected = True
        run = db.RunConnection(
            conn,
            self.settings.session(),
            self.task.name,
            lock=None if self.dry_run else self.task.name,
            read_only=self.dry_run,
            deadline=self.deadline,
            # The first transaction counts what is due through the walk column's index.
            planner=db.INDEX_WALK_PLANNER if self.batched else None,
            watch_standbys=self.pacer is not None,
        )
        try:
            self._work(run)
        except BaseException as exc:
            # A retry starts on a new connection; this one may be broken. What it committed
            # is unconfirmed when it was lost: the server may have lost it too (a failover).
            if is_connection_failure(exc):
                self.lost_rows += self.tally.rows_on_connection
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
        self._confirm(run)
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
        """The task's table, looked up with the history's in one query, and everything
        that must be true of them before a row is deleted: the privileges the run needs
        (missing: an error on every run, not only once a row is due), no other role's code
        that would run with this role's privileges, a history of the tool's own."""
        settings, schema, spec = (
            self.settings,
            self.recorded.target.schema if self.recorded.target else None,
            self.task.table,
        )
        names = settings.table_names(spec)
        history_tables = history.history_tables(run.conn.dialect.name, settings.history_schema)
        watched = run.on_postgres and settings.history
        found = db.lookup_tables(
            run.conn, [(schema, names.table), *(history.wanted(history_tables) if watched else [])]
        )
        table = db.bind(schema, spec, names, found[0])
        if isinstance(table, ConfigError):
            raise table
        if not run.on_postgres:
            return table
        refused = trust.history_problem(found[1:], settings.history_owner, settings.trusted_code) if watched else None
        if refused:
            self.recorded.history_refused = refused  # the run's record waits in the spool meanwhile
        problem = (
            trust.privilege_problem(self.task, table, deleting=not self.dry_run)
            or (None if self.dry_run else trust.code_problem(table, settings.trusted_code))
            or refused
        )
        if problem:
            raise ConfigError(problem)
        if not self.warned_beyond_need:
            self.warned_beyond_need = True
            beyond = trust.beyond_need(table.info, table.shown)
            if beyond:
                self.log.warning(
                    "privileges_beyond_need",
                    role=table.info.role,
                    beyond=beyond,
                    hint="a cleanup needs SELECT and DELETE on its tables and its own history schema; "
                    "`skybot-cleanup check` prints the statements that make such a role",
                )
        return table

    def _confirm(self, run: db.RunConnection) -> None:
        """On a new connection: are the rows the lost ones committed still there?"""
        if self.reconnects:
            if self.lost_rows and run.server_started != self.server_started:
                self.unconfirmed_rows += self.lost_rows
            self.lost_rows = 0
            self.log.warning("reconnected", reconnects=self.reconnects, unconfirmed_rows=self.unconfirmed_rows)
        self.server_started = run.server_started

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
        """Every due row nobody holds, in one statement; the held ones are counted and
        left for the next run. A row the app takes after the statement's snapshot makes
        it wait, at most its lock timeout, and it is redone without that row."""
        tally = self.tally
        if not run.on_postgres:
            tally.rows = int(run.conn.execute(sa.delete(table.table).where(due)).rowcount)
            tally.remaining, tally.remaining_exact = 0, True
            return
        self.excluded = set()
        for _ in range(RACE_RETRIES + 1):
            try:
                tally.rows = db.delete_all(run.conn, table, due, run.snapshot_xmax, self.excluded)
                return
            except sa.exc.OperationalError as exc:
                note_race(run, exc, self.excluded)
        raise RowsTakenMidStatement(f"the app took due rows mid-statement {RACE_RETRIES + 1} times running")

    # -- batches ------------------------------------------------------------------------------

    def _batches(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> None:
        """Delete in short committed batches along a new walk. The tally moves only once a
        batch has committed, so a retry after a lost commit redoes that batch."""
        tally = self.tally
        if self.on_progress is not None and tally.estimated_total is None:
            tally.estimated_total = tally.rows + _estimate(run.conn, table, due)
        walk = self._choose_walk(run, table, due)
        if walk is None:  # nothing due (held rows included): no walk, and nothing to count again
            tally.remaining, tally.remaining_exact = 0, True
            return
        run.commit_and_continue(planner=walk.planner)
        self._walk(run, walk)
        if walk.ended or tally.stopped_by is not None:
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

    def _choose_walk(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> Walk | None:
        """The index walk when few rows are due (counted through the index, up to a cap:
        cheap whatever the backlog); the heap walk otherwise; None when nothing is due."""
        info, column = table.info, self.task.walk_column
        if not run.on_postgres:
            return RowidWalk(run, table, due)
        if column is None or info.shape is db.TableShape.INHERITED:
            # No index serves the predicate, or not every child has one: the heap, once a
            # first due row shows there is anything to walk.
            self.log.debug("walk", walk=WalkKind.HEAP, pages=info.pages, shape=info.shape)
            if db.count_capped(run.conn, table, due, 1) == 0:
                return None
            return HeapWalk(run, table, due, self.settings.batch_size)
        cap = max(1, int(info.pages * INDEX_WALK_SHARE_OF_PAGES))
        counted = db.count_capped(run.conn, table, due, cap, order_by=table.columns[column])
        self.log.debug(
            "walk", walk=WalkKind.INDEX if counted < cap else WalkKind.HEAP, due_counted=counted, pages=info.pages
        )
        if counted == 0:
            return None
        if counted < cap:
            return IndexWalk(run, table, due, table.columns[column])
        return HeapWalk(run, table, due, self.settings.batch_size)

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
            self._committed(run, walk, deleted, started)
            if walk.ended:
                return
            if settings.max_rows is not None and tally.rows >= settings.max_rows:
                tally.stopped_by = StopReason.MAX_ROWS
                return
            tally.stopped_by = self._pause(run)
            if tally.stopped_by is not None:
                return

    def _committed(self, run: db.RunConnection, walk: Walk, deleted: int, started: float) -> None:
        tally, held = self.tally, run.held_in_last_transaction
        if held:
            self.log.info("held_rows_left", rows=held, batch=tally.batches + 1)
        walk.committed(held)
        tally.rows += deleted
        tally.rows_on_connection += deleted
        tally.batches += 1
        tally.longest_batch_ms = max(tally.longest_batch_ms, (time.monotonic() - started) * 1000)
        self._report_progress()

    def _pause(self, run: db.RunConnection) -> StopReason | None:
        """Between two batches: as long as the standbys need to come back within half the
        lag target, and --sleep-ms (the time already waited counts toward it). Why the run
        must stop instead, if it must."""
        began = time.monotonic()
        if self.pacer is not None:
            stop = self._wait_for_standbys(run, self.pacer)
            if stop is not None:
                return stop
        rest = self.settings.sleep_ms / 1000 - (time.monotonic() - began)
        if rest > 0:
            if self._out_of_time(after_s=rest):  # do not sleep past the cap
                return StopReason.MAX_RUNTIME
            time.sleep(rest)
        return None

    def _wait_for_standbys(self, run: db.RunConnection, pacer: ReplicaPacer) -> StopReason | None:
        """Wait, reading the standbys every POLL_S, until the pacer says go. The time goes
        to the result (replica_wait_s) and counts against --max-runtime."""
        pacer.observe(run.read_at, run.standbys)
        self._warn_if_standbys_invisible(pacer)
        began = logged = time.monotonic()
        waited = False
        try:
            while (wait := pacer.pause_s()) > 0:
                step = min(wait, POLL_S)
                if self._out_of_time(after_s=step):
                    return StopReason.MAX_RUNTIME
                waited = True
                time.sleep(step)
                run.read_standbys()
                pacer.observe(run.read_at, run.standbys)
                if pacer.stalled(run.read_at):
                    self.log.warning("replica_stalled", lag_s=round(pacer.lag_s(), 3), standbys=list(pacer.tracks))
                    return StopReason.REPLICA_LAG
                if time.monotonic() - logged >= WAIT_LOG_INTERVAL_S:
                    logged = time.monotonic()
                    self.log.info("waiting_for_standbys", lag_s=round(pacer.lag_s(), 3), target_s=pacer.target_s)
            return None
        finally:
            if waited:
                self.tally.replica_wait_s += time.monotonic() - began

    def _warn_if_standbys_invisible(self, pacer: ReplicaPacer) -> None:
        if pacer.invisible and STANDBYS_INVISIBLE not in self.warnings:
            self.warnings.append(STANDBYS_INVISIBLE)
            self.log.warning(
                "replica_lag_unknown",
                hint=f"{STANDBYS_INVISIBLE}; `skybot-cleanup check` prints the GRANT (pg_read_all_stats)",
            )

    def _out_of_time(self, after_s: float = 0.0) -> bool:
        """No batch may start now (or, after a pause of `after_s`)."""
        return self.work_deadline is not None and time.monotonic() + after_s >= self.work_deadline

    def _report_progress(self) -> None:
        tally = self.tally
        if self.on_progress is not None:
            self.on_progress(tally.rows, tally.estimated_total)
        now = time.monotonic()
        if now - tally.last_log >= PROGRESS_LOG_INTERVAL_S:
            tally.last_log = now
            elapsed = now - self.recorded.clock_started
            self.log.info(
                "progress",
                rows=tally.rows,
                batches=tally.batches,
                rows_per_s=round(tally.rows / elapsed) if elapsed else None,
            )


def _estimate(conn: sa.Connection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> int:
    """Due rows for a progress bar: the planner's estimate on PostgreSQL (no scan)."""
    if conn.dialect.name == "postgresql":
        return db.estimate_rows(conn, table, due)
    return int(conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(due)) or 0)
