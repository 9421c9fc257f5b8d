"""A cleanup run: one task, one cutoff, one connection at a time, batch by batch; the
library API behind every cleanup command.

A batched run picks its walk from what is due, in its first transaction:
- the index walk, when fewer rows are due than an eighth of the table's pages: batches
  of due rows in the order of the task's indexed column, each deleted by ctid;
- the heap walk, for a big backlog (and for tasks whose predicate has no index): the
  table's pages in order, a TID range per batch, sized to hold about a batch of due rows.
Both lock rows in heap order and leave the rows the app holds for the next run (db.batches).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from skybot_cleanup import db
from skybot_cleanup.clock import iso_utc
from skybot_cleanup.cutoff import RunTime, cutoff, run_time
from skybot_cleanup.errors import RowsTakenMidStatement, SqlState, is_connection_failure, sqlstate_of
from skybot_cleanup.recording import RecordedRun
from skybot_cleanup.registry import Task
from skybot_cleanup.results import RunResult
from skybot_cleanup.retry import with_retries
from skybot_cleanup.settings import CleanupSettings

PROGRESS_LOG_INTERVAL_S = 5.0
# A batch that meets rows taken by the app after its snapshot is tried again without them
# this many times, then its pages are left for the next run: held rows never stall a run.
RACE_RETRIES = 3
# The index walk while fewer rows are due than this share of the table's pages; the heap
# walk past it (docs/benchmarks.md: where each is faster, by layout).
INDEX_WALK_SHARE_OF_PAGES = 1 / 8
# `remaining` is counted up to this many rows (a lower bound past it), and never in
# more than this share of the run's time cap.
REMAINING_COUNT_CAP = 1_000_000
REMAINING_AFTER_MAX_RUNTIME_CAP = 10_000

ProgressCallback = Callable[[int, int | None], None]  # (rows done, estimated total)


@dataclass
class Progress:
    """What a run has committed so far; survives a failure (and a retry) for the report."""

    rows: int = 0
    batches: int = 0
    walk: str | None = None  # index | heap | rowid (SQLite), chosen on each connection
    next_page: int = 0  # the heap walk: the first page of the next batch
    low: Any = None  # the index walk: its column's value the next batch starts at
    walked_to_end: bool = False
    held: int = 0  # due rows the app held when a batch reached them (counted by the server)
    last_batch: tuple[int, int] = (0, 0)  # the heap walk's last committed batch: its pages, the due rows it found
    batch_pages: int = 0  # the heap walk: pages the next batch covers (0: a page at a time, capped)
    # The heap walk in batches of exactly the batch size (a page holds more due rows than
    # that, or --max-rows is near): held rows are then counted at the end.
    capped: bool = False
    excluded: set[str] = field(default_factory=set)  # ctids taken by the app after a batch's snapshot
    skipped_pages: list[tuple[int, int]] = field(default_factory=list)  # batches left to the next run
    remaining: int | None = None
    remaining_exact: bool | None = None
    stopped_by: str | None = None
    estimated_total: int | None = None
    longest_batch_ms: float = 0.0
    last_log: float = field(default_factory=time.monotonic)
    rows_on_connection: int = 0  # committed on the current connection

    def restart_walk(self) -> None:
        """Walk from the start of the due range again (on a new connection)."""
        self.walk, self.next_page, self.low, self.walked_to_end = None, 0, None, False
        self.held, self.capped, self.excluded, self.skipped_pages = 0, False, set(), []
        self.last_batch = (0, 0)


def run_task(
    settings: CleanupSettings,
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
    """One run of one task: its cutoff, connection, progress and result."""

    def __init__(
        self,
        settings: CleanupSettings,
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
            self.deadline = self.clock_started + settings.max_runtime_s
            self.work_deadline = self.deadline - min(1.0, settings.max_runtime_s / 10)
        self.on_progress = on_progress
        self.progress = Progress()
        self.connected = False  # a connection of this run has been open (so a new one replaces it)
        self.reconnects = 0
        self.unconfirmed_rows = 0
        self.warnings: list[str] = []
        self.log = self.recorded.log

    @property
    def clock_started(self) -> float:
        return self.recorded.clock_started

    def execute(self) -> RunResult:
        return self.recorded.execute(lambda: with_retries(self.settings, self._attempt, log=self.log), self._details)

    def _details(self) -> dict[str, Any]:
        progress = self.progress
        reports_remaining = not self.dry_run
        return {
            "rows": progress.rows,
            "cutoff": self.cutoff,
            "batches": progress.batches if self.batched else None,
            "remaining": progress.remaining if reports_remaining else None,
            "remaining_exact": progress.remaining_exact if reports_remaining else None,
            "stopped_by": progress.stopped_by,
            "longest_batch_ms": round(progress.longest_batch_ms) if self.batched else None,
            "clock_skew_s": self.time.skew_s if self.time else None,
            "reconnects": self.reconnects or None,
            "unconfirmed_rows": self.unconfirmed_rows or None,
            "warnings": self.warnings or None,
        }

    # -- one attempt --------------------------------------------------------------------------

    def _attempt(self) -> None:
        """One connection, one chain of transactions. Idempotent: a retry after any
        failure walks the due rows again from their start, under the same cutoff: a
        position in a walk means nothing on another connection (after a failover, on
        another server)."""
        recorded = self.recorded
        assert recorded.engine is not None and recorded.target is not None
        conn = recorded.conn = recorded.engine.connect()
        if self.connected:
            self.reconnects += 1
            self.progress.restart_walk()
            self.log.warning("reconnected", reconnects=self.reconnects, unconfirmed_rows=self.unconfirmed_rows)
        self.connected = True
        run = db.RunConnection(
            conn,
            self.settings.session(),
            self.task.name,
            lock=None if self.dry_run else self.task.name,
            read_only=self.dry_run,
            deadline=self.deadline,
        )
        try:
            self._work(run)
        except BaseException as exc:
            # A retry starts on a new connection; this one may be broken. What it committed
            # is unconfirmed when it was lost: the server may have lost it too (a failover).
            if is_connection_failure(exc):
                self.unconfirmed_rows += self.progress.rows_on_connection
            self.progress.rows_on_connection = 0
            run.rollback()
            recorded.close_connection()
            if not (sqlstate_of(exc) == SqlState.QUERY_CANCELED and self._out_of_time()):
                raise
            self.progress.stopped_by = "max_runtime"  # the cap came before the run could start its walk

    def _work(self, run: db.RunConnection) -> None:
        recorded, conn = self.recorded, run.conn
        assert recorded.target is not None
        run.begin()
        cutoff = self._cutoff(run)
        table = db.bind_table(conn, recorded.target.schema, self.task.table, self.settings.table_names(self.task.table))
        self._warn_of_row_level_security(table)
        due = self.task.due(table.columns, cutoff)
        if self.dry_run:
            self.progress.rows = int(conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(due)) or 0)
        elif not self.batched:
            self._single_transaction(run, table, due)
        else:
            self._batches(run, table, due)
        run.commit()
        if not (self.batched or self.dry_run) and run.on_postgres:  # held rows are counted as it commits
            self.progress.remaining = run.held_in_last_transaction + len(self.progress.excluded)
            self.progress.remaining_exact = True

    def _cutoff(self, run: db.RunConnection) -> datetime:
        """The first transaction reads the server's clock: the run's now is the earlier
        of the two clocks, so a row is deleted only once it has expired by both."""
        if self.cutoff is not None:
            return self.cutoff
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
        progress = self.progress
        if not run.on_postgres:
            progress.rows = int(run.conn.execute(sa.delete(table.table).where(due)).rowcount)
            progress.remaining, progress.remaining_exact = 0, True
            return
        for _ in range(RACE_RETRIES + 1):
            try:
                progress.rows = db.delete_all(run.conn, table, due, run.snapshot_xmax, progress.excluded)
                return
            except sa.exc.OperationalError as exc:
                self._note_race(run, exc)
        raise RowsTakenMidStatement(f"the app took due rows mid-statement {RACE_RETRIES + 1} times running")

    def _note_race(self, run: db.RunConnection, exc: sa.exc.OperationalError) -> None:
        """A lock timeout on a row the app took after the statement began: undo the
        statement, and leave that row out of the next try. Anything else is raised."""
        held = db.held_tuple(exc) if sqlstate_of(exc) == SqlState.LOCK_NOT_AVAILABLE and run.on_postgres else None
        if held is None:
            raise exc
        run.undo_work()
        self.progress.excluded.add(held)
        self.log.info("batch_met_held_row", ctid=held)

    # -- batches ------------------------------------------------------------------------------

    def _batches(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> None:
        """Delete in short committed batches. The progress moves only once a batch has
        committed, so a retry after a lost commit redoes that batch."""
        progress = self.progress
        if self.on_progress is not None and progress.estimated_total is None:
            progress.estimated_total = progress.rows + _estimate(run.conn, table, due)
        if not run.on_postgres:
            progress.walk = "rowid"
            self._walk(run, lambda limit: self._rowid_batch(run, table, due, limit))
            progress.remaining = db.count_capped(run.conn, table, due, REMAINING_COUNT_CAP)
            progress.remaining_exact = progress.remaining < REMAINING_COUNT_CAP
            return
        pages = db.heap_pages(run.conn, table)
        if progress.walk is None:
            progress.walk, due_counted = self._choose_walk(run, table, due, pages)
            if due_counted == 0:  # nothing due (held rows included): no walk, and nothing to count again
                progress.walked_to_end = True
                progress.remaining, progress.remaining_exact = 0, True
                return
        if progress.walk == "index":
            run.commit_and_continue(planner=db.INDEX_WALK_PLANNER)
            walk = table.columns[str(self.task.walk_column)]
            self._walk(run, lambda limit: self._index_batch(run, table, due, walk, limit))
        else:
            run.commit_and_continue(planner=db.HEAP_WALK_PLANNER)
            progress.batch_pages = _initial_pages(table, self.settings.batch_size)
            statement = db.page_range_delete(table, due)
            self._walk(run, lambda limit: self._heap_batch(run, table, due, statement, pages, limit))
        self._count_remaining(run, table, due, pages)

    def _choose_walk(
        self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool], pages: int
    ) -> tuple[str, int | None]:
        """The index walk when few rows are due (counted through the index, up to a cap:
        cheap whatever the backlog); the heap walk otherwise, and always for a task whose
        predicate no index serves. With the due rows it counted (None: not counted)."""
        if self.task.walk_column is None:
            return "heap", None
        cap = max(1, int(pages * INDEX_WALK_SHARE_OF_PAGES))
        column = table.columns[str(self.task.walk_column)]
        counted = db.count_capped(run.conn, table, due, cap, order_by=column)  # through its index
        walk = "index" if counted < cap else "heap"
        self.log.debug("walk", walk=walk, due_counted=counted, pages=pages)
        return walk, counted

    def _walk(self, run: db.RunConnection, batch: Callable[[int], int]) -> None:
        """Batches until the walk ends or a cap stops it: `batch(limit)` deletes up to
        about `limit` rows, sets progress.walked_to_end when it was the last one, and
        returns the rows it deleted."""
        settings, progress = self.settings, self.progress
        while not progress.walked_to_end:
            limit = settings.batch_size
            if settings.max_rows is not None:
                limit = min(limit, settings.max_rows - progress.rows)
                if limit <= 0:  # reached by an earlier attempt of this run
                    progress.stopped_by = "max_rows"
                    return
            if self._out_of_time():
                progress.stopped_by = "max_runtime"
                return
            started = time.monotonic()
            try:
                deleted = batch(limit)
            except sa.exc.OperationalError as exc:
                if not (sqlstate_of(exc) == SqlState.QUERY_CANCELED and self._out_of_time()):
                    raise
                run.undo_work()  # the batch met the end of --max-runtime: stop, keep what committed
                progress.stopped_by = "max_runtime"
                return
            run.commit_and_continue()
            held = run.held_in_last_transaction
            if held:
                self.log.info("held_rows_left", rows=held, batch=progress.batches + 1)
            progress.held += held
            progress.last_batch = (progress.last_batch[0], deleted + held)
            progress.rows += deleted
            progress.rows_on_connection += deleted
            progress.batches += 1
            progress.longest_batch_ms = max(progress.longest_batch_ms, (time.monotonic() - started) * 1000)
            self._report_progress()
            if progress.walked_to_end:
                return
            if settings.max_rows is not None and progress.rows >= settings.max_rows:
                progress.stopped_by = "max_rows"
                return
            if settings.sleep_ms:
                if self._out_of_time(after_s=settings.sleep_ms / 1000):  # do not sleep past the cap
                    progress.stopped_by = "max_runtime"
                    return
                time.sleep(settings.sleep_ms / 1000)

    def _rowid_batch(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool], limit: int) -> int:
        deleted = db.delete_rowids(run.conn, table, due, limit)
        self.progress.walked_to_end = deleted < limit
        return deleted

    def _out_of_time(self, after_s: float = 0.0) -> bool:
        """No batch may start now (or, after a pause of `after_s`)."""
        return self.work_deadline is not None and time.monotonic() + after_s >= self.work_deadline

    def _index_batch(
        self,
        run: db.RunConnection,
        table: db.BoundTable,
        due: sa.ColumnElement[bool],
        walk: sa.ColumnElement[Any],
        limit: int,
    ) -> int:
        """The next `limit` due rows nobody holds, in the walk column's order, deleted by ctid."""
        progress = self.progress
        where = sa.and_(due, db.guard(due, run.snapshot_xmax, count=False))
        if progress.low is not None:
            where = sa.and_(where, walk >= progress.low)  # ">=": rows of equal value may be left
        picked = db.pick(run.conn, table, where, limit, order_by=walk, partitioned=table.info.partitioned)
        ctids = [ctid for ctid, _ in picked]
        for _ in range(RACE_RETRIES + 1):
            try:
                deleted = db.delete_ctids(
                    run.conn, table, due, ctids, run.snapshot_xmax, progress.excluded, picked=picked
                )
                break
            except sa.exc.OperationalError as exc:
                self._note_race(run, exc)
        else:
            deleted = 0  # left for the next run, and counted in remaining
        # Fewer than asked: none are left. None deleted of a full batch (all taken by the
        # app since they were picked): stop rather than pick them again and again.
        progress.walked_to_end = len(picked) < limit or deleted == 0
        if picked:
            progress.low = picked[-1][1][0] if table.info.partitioned else picked[-1][1]
        return deleted

    def _heap_batch(
        self,
        run: db.RunConnection,
        table: db.BoundTable,
        due: sa.ColumnElement[bool],
        statement: sa.Delete,
        pages: int,
        limit: int,
    ) -> int:
        """The due rows nobody holds on the next pages of the heap: as many pages as held
        about `limit` due rows last time (progress.batch_pages, adapted here)."""
        progress = self.progress
        first = progress.next_page
        span, found = progress.last_batch
        if span and not progress.capped:  # sized by what the last batch found
            progress.batch_pages = 0 if span == 1 and found > limit else _next_pages(span, found, limit)
        if progress.batch_pages < 1 or progress.capped:  # a page holds more due rows than a batch may: a page at a time
            return self._heap_batch_capped(run, table, due, pages, limit, span=1)
        end = min(first + progress.batch_pages, pages)
        if limit < self.settings.batch_size:  # the last batch under --max-rows: exactly `limit` rows
            return self._heap_batch_capped(run, table, due, pages, limit, span=end - first)
        for _ in range(RACE_RETRIES + 1):
            try:
                deleted = db.delete_pages(run.conn, statement, first, end, run.snapshot_xmax, progress.excluded)
                break
            except sa.exc.OperationalError as exc:
                self._note_race(run, exc)
        else:
            deleted = 0
            progress.skipped_pages.append((first, end))
        progress.next_page = end
        progress.walked_to_end = end >= pages
        progress.last_batch = (end - first, deleted)  # the held ones are added as it commits
        return deleted

    def _heap_batch_capped(
        self,
        run: db.RunConnection,
        table: db.BoundTable,
        due: sa.ColumnElement[bool],
        pages: int,
        limit: int,
        span: int,
    ) -> int:
        """Exactly `limit` due rows (or all that are left) of the next `span` pages. The
        walk stays on those pages until they hold no more: no row is passed over, in any
        partition. Held rows are counted at the end (progress.capped)."""
        progress = self.progress
        progress.capped = True
        first = progress.next_page
        end = min(first + span, pages)
        in_range = sa.and_(db.ctid >= db.tid(first), db.ctid < db.tid(end))
        where = sa.and_(in_range, due, db.guard(due, run.snapshot_xmax, count=False))
        picked = db.pick(run.conn, table, where, limit, excluded=progress.excluded, partitioned=table.info.partitioned)
        deleted = db.delete_ctids(
            run.conn, table, due, [ctid for ctid, _ in picked], run.snapshot_xmax, progress.excluded, picked=picked
        )
        if len(picked) < limit or deleted == 0:  # these pages hold no more (or only rows just taken)
            progress.next_page = end
            progress.walked_to_end = end >= pages
        return deleted

    def _count_remaining(
        self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool], pages: int
    ) -> None:
        """Due rows left: counted, on this connection. A walk to the end knows its held
        rows; what a cap left, and the index walk's rest, is counted up to a cap (after
        --max-runtime, about ten batches' worth), and past it is a lower bound."""
        progress, conn = self.progress, run.conn
        known = len(progress.excluded)
        for first, end in progress.skipped_pages:
            known += db.count_capped(conn, table, sa.and_(db.ctid >= db.tid(first), db.ctid < db.tid(end), due), 10**9)
        if progress.walk == "heap" and progress.walked_to_end and not progress.capped:
            progress.remaining, progress.remaining_exact = progress.held + known, True
            return
        cap = REMAINING_COUNT_CAP
        if progress.stopped_by == "max_runtime":
            cap = max(10 * self.settings.batch_size, REMAINING_AFTER_MAX_RUNTIME_CAP)
        whole = progress.walk == "index" or progress.capped
        rest = due if whole else sa.and_(db.ctid >= db.tid(progress.next_page), due)
        # The index walk's rest through its index, as its batches went; otherwise any
        # plan: its time is still bounded.
        walk = table.columns[str(self.task.walk_column)] if progress.walk == "index" else None
        run.commit_and_continue(planner={})
        try:
            with db.savepoint(conn, "count"):
                counted = db.count_capped(conn, table, rest, cap, order_by=walk)
        except sa.exc.OperationalError as exc:
            if sqlstate_of(exc) != SqlState.QUERY_CANCELED:
                raise
            progress.remaining, progress.remaining_exact = progress.held + known, False  # out of time: at least
            return
        already = 0 if whole else progress.held + known
        progress.remaining, progress.remaining_exact = already + counted, counted < cap

    def _report_progress(self) -> None:
        progress = self.progress
        if self.on_progress is not None:
            self.on_progress(progress.rows, progress.estimated_total)
        now = time.monotonic()
        if now - progress.last_log >= PROGRESS_LOG_INTERVAL_S:
            progress.last_log = now
            elapsed = now - self.clock_started
            self.log.info(
                "progress",
                rows=progress.rows,
                batches=progress.batches,
                rows_per_s=round(progress.rows / elapsed) if elapsed else None,
            )


# Rows a page may hold at the most, for a first batch on a table the planner knows nothing
# of: the batch is then small, and the next ones are sized by what it found.
MAX_ROWS_PER_PAGE = 200


def _initial_pages(table: db.BoundTable, batch_size: int) -> int:
    """Pages the first heap batch covers: as many as hold `batch_size` rows by the planner's
    rows per page (a guess the next batches correct); 0 when one page holds more."""
    per_page = float(MAX_ROWS_PER_PAGE)
    if table.info.estimated_rows and table.info.pages:
        per_page = max(table.info.estimated_rows / table.info.pages, 1.0)
    return 0 if per_page > batch_size else max(1, round(batch_size / per_page))


def _next_pages(pages: int, found: int, limit: int) -> int:
    """The next heap batch's size: the pages that would have held `limit` due rows at the
    density just seen, growing at most fourfold a batch (a stretch of live rows must not
    make one batch read the rest of the table)."""
    if found == 0:
        return pages * 4
    return max(1, min(pages * 4, round(pages * limit / found)))


def _estimate(conn: sa.Connection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> int:
    """Due rows for a progress bar: the planner's estimate on PostgreSQL (no scan)."""
    if conn.dialect.name == "postgresql":
        return db.estimate_rows(conn, table, due)
    return int(conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(due)) or 0)
