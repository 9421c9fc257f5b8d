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
from skybot_cleanup.errors import EXIT_OK, EXIT_SKIPPED, Failure, Interrupted, classify, is_connection_failure
from skybot_cleanup.logs import get_logger
from skybot_cleanup.retry import with_retries
from skybot_cleanup.settings import CleanupSettings
from skybot_cleanup.tasks import Task

PROGRESS_LOG_INTERVAL_S = 5.0
# A batch that met a row the app holds is split and retried with this lock timeout.
PROBE_LOCK_TIMEOUT_MS = 100
# `remaining` after a run stopped by a cap is counted up to this many rows.
REMAINING_COUNT_CAP = 1_000_000

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

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class Progress:
    """What a run has committed so far; survives a failure (and a retry) for the report."""

    rows: int = 0
    batches: int = 0
    low: db.LowWater = field(default_factory=db.LowWater)  # where the next batch starts
    walked_to_end: bool = False
    skipped: int = 0  # due rows left behind because the app held them
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
        pinger = heartbeat.Pinger.from_settings(settings, task.name, self.run_id)
        with structlog.contextvars.bound_contextvars(task=task.name, run_id=self.run_id):
            pinger.ping("start")
            failure: Failure | None = None
            unreachable = False
            try:
                self.target = database_target(settings)
                self.engine = db.create_engine(self.target, settings, task.name)
                with_retries(settings, self._attempt, log=self.log)
            except (Exception, Interrupted) as exc:
                failure = classify(exc, secrets=self._secrets())
                unreachable = is_connection_failure(exc)
                event = {"skipped": "run_skipped", "interrupted": "interrupted"}.get(failure.status, "run_failed")
                (self.log.warning if failure.status == "skipped" else self.log.error)(
                    event, error_class=failure.error_class, error=failure.message, rows=self.progress.rows
                )
            result = self._result(failure)
            try:
                if self.target is not None:
                    # The run's own connection when it succeeded; a new one after a
                    # failure (none when the database cannot be reached at all).
                    bind = self.conn or (None if unreachable else self.engine)
                    history.record_run(bind, settings, result, self.target.display)
            finally:
                self._close()
                if self.engine is not None:
                    self.engine.dispose()
            pinger.ping(str(result.exit_code), body=_ping_body(result))
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

    def _batches(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool]) -> None:
        """Delete in short committed batches, walking the index from a low-water mark.

        Each batch is a range of the walk column: its end is found by an index-only
        scan `batch_size` rows ahead, so no batch re-reads what earlier ones deleted
        (even while a long transaction elsewhere keeps dead tuples around), and the
        delete itself is one index range scan. No FOR UPDATE: the role needs no
        UPDATE privilege. A batch that meets a row the app holds is undone and
        split until the held rows are isolated; they are left for a later run.
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
            batch_started = time.monotonic()
            end = db.batch_end(conn, table, walk, progress.low, limit, below)
            if end is not None and not progress.low.exclusive and end == progress.low.value:
                deleted = self._delete_ties(run, table, due, walk, end, limit)
            else:
                deleted = self._delete_range(run, table, due, walk, progress.low, end, limit)
                progress.low = db.LowWater(end)
                progress.walked_to_end = end is None
            run.commit_and_continue()
            progress.rows += deleted
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
        progress.remaining = progress.skipped
        if not progress.walked_to_end:
            ahead = sa.and_(due, progress.low.clause(walk))
            progress.remaining += db.count_capped(conn, table, ahead, REMAINING_COUNT_CAP)

    def _delete_range(
        self,
        run: db.RunConnection,
        table: db.BoundTable,
        due: sa.ColumnElement[bool],
        walk: sa.ColumnElement[Any],
        low: db.LowWater,
        end: Any,
        rows: int,
    ) -> int:
        try:
            return db.delete_range(run.conn, table, due, walk, low, end)
        except sa.exc.OperationalError as exc:
            if not (run.on_postgres and _is_lock_timeout(exc)):
                raise
        run.undo_work()
        self.log.info("batch_met_held_rows", low=str(low.value), end=str(end))
        return self._around_held_rows(run, table, due, walk, low, end, rows)

    def _around_held_rows(
        self,
        run: db.RunConnection,
        table: db.BoundTable,
        due: sa.ColumnElement[bool],
        walk: sa.ColumnElement[Any],
        low: db.LowWater,
        end: Any,
        rows: int,
    ) -> int:
        """Split [low, end) until each part deletes without waiting; parts that still
        meet a held row and cannot be split by the walk value are left behind."""
        conn, deleted = run.conn, 0
        bounded = sa.and_(low.clause(walk), walk < end if end is not None else sa.true())
        pending = [(low, end, db.count_capped(conn, table, bounded, rows))]
        probe_ms = min(self.settings.lock_timeout_ms or PROBE_LOCK_TIMEOUT_MS, PROBE_LOCK_TIMEOUT_MS)
        while pending:
            part_low, part_end, part_rows = pending.pop()
            try:
                with run.probe(probe_ms):
                    deleted += db.delete_range(run.conn, table, due, walk, part_low, part_end)
                continue
            except sa.exc.OperationalError as exc:
                if not _is_lock_timeout(exc):
                    raise
            below = part_end if part_end is not None else (self.cutoff if self.task.walk_bounded_by_cutoff else None)
            middle = db.batch_end(run.conn, table, walk, part_low, max(part_rows // 2, 1), below)
            if part_rows > 1 and middle is not None and middle != part_low.value:
                pending += [
                    (db.LowWater(middle), part_end, part_rows - part_rows // 2),
                    (part_low, middle, part_rows // 2),
                ]
            else:
                left = sa.and_(due, part_low.clause(walk), walk < part_end if part_end is not None else sa.true())
                self.progress.skipped += db.count_capped(run.conn, table, left, part_rows + 1)
        return deleted

    def _delete_ties(
        self,
        run: db.RunConnection,
        table: db.BoundTable,
        due: sa.ColumnElement[bool],
        walk: sa.ColumnElement[Any],
        value: Any,
        limit: int,
    ) -> int:
        """More than a batch of rows share the low-water value: delete them in chunks."""
        try:
            deleted = db.delete_ties(run.conn, table, due, walk, value, limit)
        except sa.exc.OperationalError as exc:
            if not (run.on_postgres and _is_lock_timeout(exc)):
                raise
            run.undo_work()
            self.progress.skipped += db.count_capped(run.conn, table, sa.and_(due, walk == value), limit)
            deleted = 0
        if deleted < limit:
            self.progress.low = db.LowWater(value, exclusive=True)
        return deleted

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


def _ping_body(result: RunResult) -> str:
    body = f"task={result.task} status={result.status} rows={result.rows} duration_ms={result.duration_ms}"
    return body + (f" error={result.error}" if result.error else "")
