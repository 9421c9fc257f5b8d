"""A cleanup run: one task, one cutoff, one connection at a time, batch by batch; the
library API behind every cleanup command."""

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
from skybot_cleanup.errors import SqlState, is_connection_failure, sqlstate_of
from skybot_cleanup.recording import RecordedRun
from skybot_cleanup.registry import Task
from skybot_cleanup.results import RunResult
from skybot_cleanup.retry import with_retries
from skybot_cleanup.settings import CleanupSettings

PROGRESS_LOG_INTERVAL_S = 5.0
# A batch that met a row the app holds is split and retried with this lock timeout.
PROBE_LOCK_TIMEOUT_MS = 100
# `remaining` after a run stopped by a cap is counted up to this many rows.
REMAINING_COUNT_CAP = 1_000_000
REMAINING_AFTER_MAX_RUNTIME_CAP = 10_000

ProgressCallback = Callable[[int, int | None], None]  # (rows done, estimated total)


@dataclass
class Batch:
    """What one batch did, applied to the run's progress only once it has committed."""

    low: db.LowWater
    walked_to_end: bool = False
    deleted: int = 0
    held: set[Any] = field(default_factory=set)  # ids of due rows the app held


@dataclass
class Progress:
    """What a run has committed so far; survives a failure (and a retry) for the report."""

    rows: int = 0
    batches: int = 0
    low: db.LowWater = field(default_factory=db.LowWater)  # where the next batch starts
    walked_to_end: bool = False
    held: set[Any] = field(default_factory=set)  # ids of due rows left behind: the app held them
    remaining: int | None = None
    remaining_exact: bool | None = None
    stopped_by: str | None = None
    estimated_total: int | None = None
    longest_batch_ms: float = 0.0
    last_log: float = field(default_factory=time.monotonic)
    rows_on_connection: int = 0  # committed on the current connection

    def restart_walk(self) -> None:
        """Walk from the start of the due range again (on a new connection)."""
        self.low, self.walked_to_end, self.held = db.LowWater(), False, set()


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
        self.batched = not dry_run and settings.batch_size is not None
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
        return {
            "rows": progress.rows,
            "cutoff": self.cutoff,
            "batches": progress.batches if self.batched else None,
            "remaining": progress.remaining if self.batched else None,
            "remaining_exact": progress.remaining_exact if self.batched else None,
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
        low-water mark means nothing on another connection (after a failover, on
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
        )
        try:
            run.begin()
            cutoff = self._cutoff(run)
            table = db.bind_table(
                conn, recorded.target.schema, self.task.table, self.settings.table_names(self.task.table)
            )
            self._warn_of_row_level_security(table)
            due = self.task.due(table.columns, cutoff)
            if self.dry_run:
                self.progress.rows = int(
                    conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(due)) or 0
                )
            elif self.batched:
                self._batches(run, table, due)
            else:
                self.progress.rows = int(conn.execute(sa.delete(table.table).where(due)).rowcount)
            run.commit()
        except BaseException as exc:
            # A retry starts on a new connection; this one may be broken. What it committed
            # is unconfirmed when it was lost: the server may have lost it too (a failover).
            if is_connection_failure(exc):
                self.unconfirmed_rows += self.progress.rows_on_connection
            self.progress.rows_on_connection = 0
            run.rollback()
            recorded.close_connection()
            raise

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

    def _batches(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> None:
        """Delete in short committed batches, walking the index from a low-water mark.

        Each batch is a range of the walk column: its end is found by an index-only
        scan `batch_size` rows ahead, so no batch re-reads what earlier ones deleted
        (even while a long transaction elsewhere keeps dead tuples around), and the
        delete itself is one index range scan. No FOR UPDATE: the role needs no
        UPDATE privilege. A batch that meets a row the app holds is undone and redone
        around it (_around_held_rows). The progress moves only once a batch has
        committed, so a retry after a lost commit redoes that batch.
        """
        settings, progress = self.settings, self.progress
        assert settings.batch_size is not None
        conn = run.conn
        walk = table.columns[self.task.walk_column]
        below = self.cutoff if self.task.walk_bounded_by_cutoff else None
        if self.on_progress is not None and progress.estimated_total is None:
            progress.estimated_total = progress.rows + _estimate(conn, table, due)
        while not progress.walked_to_end:
            limit = settings.batch_size
            if settings.max_rows is not None:
                limit = min(limit, settings.max_rows - progress.rows)
                if limit <= 0:  # reached by an earlier attempt of this run
                    progress.stopped_by = "max_rows"
                    break
            batch_started = time.monotonic()
            end = db.batch_end(conn, table, walk, progress.low, limit, below)
            if end is not None and not progress.low.exclusive and end == progress.low.value:
                batch = self._delete_ties(run, table, due, walk, end, limit)
            else:
                batch = self._delete_range(run, table, due, walk, progress.low, end, limit)
            run.commit_and_continue()
            progress.rows += batch.deleted
            progress.rows_on_connection += batch.deleted
            progress.held |= batch.held
            progress.low, progress.walked_to_end = batch.low, batch.walked_to_end
            progress.batches += 1
            progress.longest_batch_ms = max(progress.longest_batch_ms, (time.monotonic() - batch_started) * 1000)
            self._report_progress()
            if progress.walked_to_end:
                break
            if settings.max_rows is not None and progress.rows >= settings.max_rows:
                progress.stopped_by = "max_rows"
                break
            if settings.max_runtime_s is not None and time.monotonic() - self.clock_started >= settings.max_runtime_s:
                progress.stopped_by = "max_runtime"
                break
            if settings.sleep_ms:
                time.sleep(settings.sleep_ms / 1000)
        if progress.walked_to_end and not self.reconnects:
            progress.remaining, progress.remaining_exact = len(progress.held), True
            return
        # Counted on this connection, not estimated, but never far: after a --max-runtime
        # stop, about ten batches' worth. A count that reaches its cap is a lower bound.
        cap = REMAINING_COUNT_CAP
        if progress.stopped_by == "max_runtime":
            cap = max(10 * settings.batch_size, REMAINING_AFTER_MAX_RUNTIME_CAP)
        counted = db.count_capped(conn, table, due, cap)
        progress.remaining, progress.remaining_exact = counted, counted < cap

    def _delete_range(
        self,
        run: db.RunConnection,
        table: db.BoundTable,
        due: sa.ColumnElement[bool],
        walk: sa.ColumnElement[Any],
        low: db.LowWater,
        end: Any,
        rows: int,
    ) -> Batch:
        after = Batch(low=db.LowWater(end), walked_to_end=end is None)
        try:
            after.deleted = db.delete_range(run.conn, table, due, walk, low, end)
            return after
        except sa.exc.OperationalError as exc:
            if not (run.on_postgres and _is_lock_timeout(exc)):
                raise
        run.undo_work()
        self.log.info("batch_met_held_rows", low=str(low.value), end=str(end))
        in_range = sa.and_(low.clause(walk), walk < end if end is not None else sa.true())
        after.deleted, after.held = self._around_held_rows(
            run, table, due, db.ids_where(run.conn, table, sa.and_(due, in_range), rows)
        )
        return after

    def _around_held_rows(
        self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool], ids: list[Any]
    ) -> tuple[int, set[Any]]:
        """Delete these rows in halves, each with a short lock timeout, down to single
        rows: only the rows the app holds are left (and counted in `remaining`), or
        those not yet tried when --max-runtime is up."""
        deleted, held = 0, set[Any]()
        probe_ms = min(self.settings.lock_timeout_ms or PROBE_LOCK_TIMEOUT_MS, PROBE_LOCK_TIMEOUT_MS)
        deadline = self.clock_started + self.settings.max_runtime_s if self.settings.max_runtime_s else None
        pending = [ids]
        while pending:
            if deadline is not None and time.monotonic() >= deadline:
                # Many held rows cost a probe each: the time cap stops the splitting too, and
                # the rows not yet tried are left (and counted) like the held ones.
                held.update(row_id for part in pending for row_id in part)
                break
            part = pending.pop()
            try:
                with run.probe(probe_ms):
                    deleted += db.delete_ids(run.conn, table, due, part)
                continue
            except sa.exc.OperationalError as exc:
                if not _is_lock_timeout(exc):
                    raise
            if len(part) == 1:
                held.add(part[0])
            else:
                pending += [part[len(part) // 2 :], part[: len(part) // 2]]
        return deleted, held

    def _delete_ties(
        self,
        run: db.RunConnection,
        table: db.BoundTable,
        due: sa.ColumnElement[bool],
        walk: sa.ColumnElement[Any],
        value: Any,
        limit: int,
    ) -> Batch:
        """More than a batch of rows share the low-water value: delete them in chunks,
        leaving out the rows found held by earlier chunks of this run."""
        chunk = sa.and_(walk == value, due)
        held = self.progress.held
        batch = Batch(low=db.LowWater(value))
        try:
            batch.deleted = db.delete_ties(run.conn, table, chunk, limit, held)
        except sa.exc.OperationalError as exc:
            if not (run.on_postgres and _is_lock_timeout(exc)):
                raise
            run.undo_work()
            ids = db.ids_where(run.conn, table, chunk, limit, exclude=held)
            batch.deleted, batch.held = self._around_held_rows(run, table, due, ids)
        if batch.deleted + len(batch.held) < limit:  # every row of this value is done
            batch.low = db.LowWater(value, exclusive=True)
        return batch

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


def _is_lock_timeout(exc: sa.exc.OperationalError) -> bool:
    return sqlstate_of(exc) == SqlState.LOCK_NOT_AVAILABLE


def _estimate(conn: sa.Connection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> int:
    """Due rows for a progress bar: the planner's estimate on PostgreSQL (no scan)."""
    if conn.dialect.name == "postgresql":
        return db.estimate_rows(conn, table, due)
    return int(conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(due)) or 0)
