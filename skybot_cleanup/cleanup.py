"""Running a cleanup task: the library API behind every cleanup command."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from skybot_cleanup import db, heartbeat, history
from skybot_cleanup.clock import iso_utc, utc_now
from skybot_cleanup.errors import (
    EXIT_OK,
    EXIT_SKIPPED,
    Failure,
    Interrupted,
    classify,
    is_connection_failure,
    print_traceback_when_debugging,
)
from skybot_cleanup.logs import get_logger
from skybot_cleanup.retry import with_retries
from skybot_cleanup.settings import CleanupSettings
from skybot_cleanup.tasks import Task

PROGRESS_LOG_INTERVAL_S = 5.0
# A batch that met a row the app holds is split and retried with this lock timeout.
PROBE_LOCK_TIMEOUT_MS = 100
# `remaining` after a run stopped by a cap is counted up to this many rows.
REMAINING_COUNT_CAP = 1_000_000
REMAINING_AFTER_MAX_RUNTIME_CAP = 10_000

ProgressCallback = Callable[[int, int | None], None]  # (rows done, estimated total)


@dataclass
class RunResult:
    task: str
    status: str  # ok | skipped | failed | interrupted
    dry_run: bool
    rows: int
    cutoff: str
    duration_ms: int
    run_id: str
    exit_code: int = EXIT_OK
    started_at: str | None = None
    finished_at: str | None = None
    batches: int | None = None  # batched mode only
    remaining: int | None = None  # due rows left (batched mode): a cap stopped the run, or the app held them
    stopped_by: str | None = None  # max_rows | max_runtime, when a cap ended the run early
    longest_batch_ms: int | None = None
    error_class: str | None = None
    error: str | None = None
    signal: int | None = None  # a stop signal that arrived once the run's work was over

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


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
    stopped_by: str | None = None
    estimated_total: int | None = None
    longest_batch_ms: float = 0.0
    last_log: float = field(default_factory=time.monotonic)


def database_target(settings: CleanupSettings) -> db.DatabaseTarget:
    """The configured database; raises ConfigError when there is none or it is malformed."""
    url = settings.database_url.get_secret_value() if settings.database_url else None
    return db.parse_database_url(url, settings.schema_name)


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
        self.started_at = now or utc_now()
        # A UUID: healthchecks.io pairs start and end pings by it (?rid=).
        self.run_id = run_id or str(uuid.uuid4())
        # The one cutoff of this run: every batch and every retry reuses it, so a row
        # whose expiry the app extends mid-run is never deleted.
        self.cutoff = self.started_at
        if task.retention is not None:
            self.cutoff = self.started_at - timedelta(days=settings.retention_days(task))
        if self.cutoff > self.started_at:  # never reachable through settings; a guard against edits
            raise ValueError(f"{task.name}: cutoff {self.cutoff} is in the future and would delete live rows")
        self.batched = not dry_run and settings.batch_size is not None
        self.on_progress = on_progress
        self.progress = Progress()
        self.clock_started = time.monotonic()
        self.target: db.DatabaseTarget | None = None
        self.engine: sa.Engine | None = None
        self.conn: sa.Connection | None = None
        self.log = get_logger()

    # -- the outer shell: logs, retries, history, pings ---------------------------------------

    def execute(self) -> RunResult:
        settings, task = self.settings, self.task
        # A dry run tells the monitor nothing about the schedule: it does not ping.
        pinger = heartbeat.Pinger.from_settings(settings, task.name, self.run_id, enabled=not self.dry_run)
        with structlog.contextvars.bound_contextvars(task=task.name, run_id=self.run_id):
            failure: Failure | None = None
            unreachable = False
            try:
                # The engine first (it does not connect): a signal during the start ping is
                # then recorded in the history like any interruption.
                self.target = database_target(settings)
                self.engine = db.create_engine(self.target, settings, task.name)
                pinger.ping("start")  # inside: a signal while it waits is this run's interruption
                with_retries(settings, self._attempt, log=self.log)
            except (Exception, Interrupted) as exc:
                print_traceback_when_debugging(exc)
                failure = classify(exc, secrets=self._secrets())
                unreachable = is_connection_failure(exc)
                event = {"skipped": "run_skipped", "interrupted": "interrupted"}.get(failure.status, "run_failed")
                (self.log.warning if failure.status == "skipped" else self.log.error)(
                    event, error_class=failure.error_class, error=failure.message, rows=self.progress.rows
                )
            result = self._result(failure)
            # The run's own connection when it succeeded; a new one after a failure
            # (none when the database cannot be reached at all).
            bind = self.conn or (None if unreachable else self.engine)
            finish(settings, result, self.target, bind, pinger, self._release)
            self.log.info(
                "run_finished",
                **{
                    key: value
                    for key, value in result.as_dict().items()
                    if key not in ("task", "run_id", "error", "error_class")
                },
            )
        return result

    def _secrets(self) -> tuple[str, ...]:
        return (*self.settings.secrets(), *(self.target.secrets if self.target else ()))

    def _result(self, failure: Failure | None) -> RunResult:
        progress = self.progress
        exit_code = failure.exit_code if failure else EXIT_OK
        if exit_code == EXIT_SKIPPED:
            exit_code = self.settings.skipped_exit_code
        return RunResult(
            task=self.task.name,
            status=failure.status if failure else "ok",
            dry_run=self.dry_run,
            rows=progress.rows,
            cutoff=iso_utc(self.cutoff) or "",
            duration_ms=round((time.monotonic() - self.clock_started) * 1000),
            run_id=self.run_id,
            exit_code=exit_code,
            started_at=iso_utc(self.started_at),
            finished_at=iso_utc(utc_now()),
            batches=progress.batches if self.batched else None,
            remaining=progress.remaining if self.batched else None,
            stopped_by=progress.stopped_by,
            longest_batch_ms=round(progress.longest_batch_ms) if self.batched else None,
            error_class=failure.error_class if failure else None,
            error=failure.message if failure else None,
        )

    # -- one attempt --------------------------------------------------------------------------

    def _attempt(self) -> None:
        """One connection, one chain of transactions. Idempotent: a retry after any
        failure resumes from what is still due, under the same cutoff."""
        assert self.engine is not None and self.target is not None
        conn = self.conn = self.engine.connect()
        run = db.RunConnection(
            conn, self.settings, self.task.name, lock=None if self.dry_run else self.task.name, read_only=self.dry_run
        )
        try:
            run.begin()
            table = db.bind_table(conn, self.settings, self.target.schema, self.task.table)
            due = self.task.due(table.columns, self.cutoff)
            if self.dry_run:
                self.progress.rows = int(
                    conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(due)) or 0
                )
            elif self.batched:
                self._batches(run, table, due)
            else:
                self.progress.rows = int(conn.execute(sa.delete(table.table).where(due)).rowcount)
            run.commit()
        except BaseException:
            # A retry starts on a new connection; this one may be broken.
            run.rollback()
            self._close()
            raise

    def _close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _release(self) -> None:
        self._close()
        if self.engine is not None:
            self.engine.dispose()

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
        progress.remaining = len(progress.held)
        if not progress.walked_to_end:
            # Counted, not estimated, but never far: after a --max-runtime stop, about ten batches' worth.
            cap = REMAINING_COUNT_CAP
            if progress.stopped_by == "max_runtime":
                cap = max(10 * settings.batch_size, REMAINING_AFTER_MAX_RUNTIME_CAP)
            progress.remaining += db.count_capped(conn, table, sa.and_(due, progress.low.clause(walk)), cap)

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
    return getattr(exc.orig, "sqlstate", None) == "55P03"


def _estimate(conn: sa.Connection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> int:
    """Due rows for a progress bar: the planner's estimate on PostgreSQL (no scan)."""
    if conn.dialect.name == "postgresql":
        return db.estimate_rows(conn, table, due)
    return int(conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(due)) or 0)


def finish(
    settings: CleanupSettings,
    result: RunResult,
    target: db.DatabaseTarget | None,
    bind: sa.Connection | sa.Engine | None,
    pinger: heartbeat.Pinger,
    release: Callable[[], None] | None = None,
) -> None:
    """The end of every recorded run (a cleanup, the metrics job): its history row, the
    connections released, then the end ping. A signal from here on comes after the work:
    the run keeps its outcome, the caller stops after it (result.signal), and no step
    of the record is skipped but the slow one, the end ping."""
    try:
        if target is not None:
            history.record_run(bind, settings, result, target.identity)
    except Interrupted as exc:
        result.signal = exc.signum
    finally:
        if release is not None:
            release()
    if result.signal is None:
        try:
            pinger.ping(str(result.exit_code), body=_ping_body(result))
        except Interrupted as exc:
            result.signal = exc.signum


def _ping_body(result: RunResult) -> str:
    body = f"task={result.task} status={result.status} rows={result.rows} duration_ms={result.duration_ms}"
    return body + (f" error={result.error}" if result.error else "")
