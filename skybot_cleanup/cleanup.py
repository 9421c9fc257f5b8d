"""Running a cleanup task: the library API behind every CLI verb."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

import structlog

from skybot_cleanup import db, heartbeat, history
from skybot_cleanup.errors import EXIT_OK, Interrupted, classify, is_connection_failure, is_transient
from skybot_cleanup.logs import get_logger
from skybot_cleanup.settings import BaseCleanupSettings
from skybot_cleanup.tasks import Task

PROGRESS_LOG_INTERVAL_S = 5.0

ProgressCallback = Callable[[int, int | None], None]  # (rows done, estimated total)


def utc_now() -> datetime:
    """Now as naive UTC at millisecond precision: the form of Prisma's timestamp(3) columns.

    Naive matters: psycopg sends it as `timestamp`, compared as is with the column.
    An aware datetime (or SQL now()) would go through the session's time zone and
    shift the cutoff by its offset.
    """
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def iso_utc(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z; naive values are UTC already (Prisma's columns, our history)."""
    if moment is None:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds") + "Z"


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
    batches: int | None = None  # batched mode only
    remaining: int | None = None  # due rows left (batched mode): a cap stopped the run, or rows were locked
    stopped_by: str | None = None  # max_rows | max_runtime, when a cap ended the run early
    error_class: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class Progress:
    """What a run has committed so far; survives a failure for the final report."""

    rows: int = 0
    batches: int = 0
    low_water: object = None  # the walk column's value where the next batch starts
    remaining: int | None = None
    stopped_by: str | None = None
    estimated_total: int | None = None
    _last_log: float = field(default_factory=time.monotonic)


def database_target(settings: BaseCleanupSettings) -> db.DatabaseTarget:
    """The configured database; raises ConfigError when there is none or it is malformed."""
    url = settings.database_url.get_secret_value() if settings.database_url else None
    return db.parse_database_url(url, settings.schema_name)


def run_task(settings: BaseCleanupSettings, task: Task, *, dry_run: bool = False,
             now: datetime | None = None, run_id: str | None = None,
             on_progress: ProgressCallback | None = None) -> RunResult:
    """Run one task and report what happened; expected failures and signals become
    the result's status and exit code instead of exceptions."""
    started = time.monotonic()
    # A UUID: healthchecks.io pairs start and end pings by it (?rid=).
    run_id = run_id or str(uuid.uuid4())
    now = now or utc_now()
    # The one cutoff of this run: every batch and every retry reuses it, so a row
    # whose expiry the app extends mid-run is never deleted.
    cutoff = task.cutoff(now, settings)
    if cutoff > now:  # never reachable through settings; a guard against future edits
        raise ValueError(f"{task.name}: cutoff {cutoff} is in the future and would delete live rows")
    batched = not dry_run and settings.batch_size is not None
    progress = Progress()
    log = get_logger()
    target = engine = None
    unreachable = False
    ping_url = settings.ping_url.get_secret_value() if settings.ping_url else None
    with structlog.contextvars.bound_contextvars(task=task.name, run_id=run_id):
        if ping_url:
            heartbeat.ping(ping_url, task.name, "start", run_id)
        try:
            target = database_target(settings)
            engine = db.create_engine(target, settings, task.name)
            work = _run_batches if batched else _run_one_transaction
            _with_retries(settings, lambda: work(
                engine, settings, target, task, cutoff, dry_run, progress, started, on_progress))
            status, exit_code, error_class, error = "ok", EXIT_OK, None, None
        except (Exception, Interrupted) as exc:
            failure = classify(exc, secrets=(target.password,) if target and target.password else ())
            unreachable = is_connection_failure(exc)
            status, exit_code = failure.status, failure.exit_code
            error_class, error = failure.error_class, failure.message
            event = {"skipped": "run_skipped", "interrupted": "interrupted"}.get(status, "run_failed")
            (log.warning if status == "skipped" else log.error)(
                event, error_class=error_class, error=error, rows=progress.rows
            )
        result = RunResult(
            task=task.name, status=status, dry_run=dry_run, rows=progress.rows, cutoff=iso_utc(cutoff),
            duration_ms=round((time.monotonic() - started) * 1000), run_id=run_id, exit_code=exit_code,
            batches=progress.batches if batched else None,
            remaining=progress.remaining if batched else None,
            stopped_by=progress.stopped_by, error_class=error_class, error=error,
        )
        if engine is not None:
            if not unreachable:  # recording would only fail the same way, with a second warning
                history.record(engine, settings, now=utc_now(), run={
                    "run_id": run_id, "task": task.name, "status": status, "dry_run": dry_run,
                    "rows": progress.rows, "cutoff": cutoff, "finished_at": utc_now(),
                    "duration_ms": result.duration_ms, "exit_code": exit_code,
                    "error_class": error_class, "error": error})
            engine.dispose()
        if ping_url:
            heartbeat.ping(ping_url, task.name, str(exit_code), run_id,
                           body=f"task={task.name} status={status} rows={progress.rows} "
                                f"duration_ms={result.duration_ms}" + (f" error={error}" if error else ""))
        log.info("run_finished", **{k: v for k, v in result.as_dict().items()
                                    if k not in ("task", "run_id", "error", "error_class")})
    return result


def _with_retries(settings: BaseCleanupSettings, attempt: Callable[[], None]) -> None:
    """Retry transient database errors with exponential backoff.

    Safe because every attempt is idempotent: a single-transaction attempt either
    committed nothing or everything, and batched attempts resume from the rows
    that are still there, under the same cutoff.
    """
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    log = get_logger()

    def before_sleep(state) -> None:
        exc = state.outcome.exception()
        failure = classify(exc)
        log.warning("retrying", attempt=state.attempt_number, error_class=failure.error_class,
                    error=failure.message, delay_s=round(state.next_action.sleep, 3))

    retrying = Retrying(
        stop=stop_after_attempt(settings.max_retries + 1),
        wait=wait_exponential(multiplier=settings.retry_delay_ms / 1000, max=300),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    retrying(attempt)


def _run_one_transaction(engine, settings, target, task: Task, cutoff, dry_run, progress: Progress,
                         started, on_progress) -> None:
    import sqlalchemy as sa

    with db.transaction(engine, settings, label=task.name, lock=None if dry_run else task.name,
                        read_only=dry_run) as conn:
        table, columns = db.bind_table(conn, settings, target.schema, task.table)
        due = task.due(columns, cutoff)
        if dry_run:
            rows = conn.scalar(sa.select(sa.func.count()).select_from(table).where(due))
        else:
            rows = conn.execute(sa.delete(table).where(due)).rowcount
    progress.rows = rows


def _run_batches(engine, settings, target, task: Task, cutoff, _dry_run, progress: Progress,
                 started: float, on_progress: ProgressCallback | None) -> None:
    """Delete in short committed batches while one lock transaction covers the run.

    The lock is held by a separate connection's transaction for the whole run:
    transaction-scoped, so it still dies with that connection, and it survives
    PgBouncer transaction pooling, which pins that server connection to us.
    """
    import sqlalchemy as sa

    log = get_logger()
    with db.transaction(engine, settings, label=task.name, lock=task.name, hold=True) as holder, \
            engine.connect() as worker:
        table, columns = db.bind_table(worker, settings, target.schema, task.table)
        worker.rollback()
        due = task.due(columns, cutoff)
        walk = columns[task.walk_column]
        if on_progress is not None and progress.estimated_total is None:
            with worker.begin():
                progress.estimated_total = progress.rows + worker.scalar(
                    sa.select(sa.func.count()).select_from(table).where(due))
        while True:
            limit = settings.batch_size
            if settings.max_rows is not None:
                limit = min(limit, settings.max_rows - progress.rows)
            # Never delete without the lock: a lost lock connection raises here and
            # the retry takes the lock again (or finds another run has it).
            db.confirm_lock(holder)
            batch_started = time.monotonic()
            with worker.begin():
                db.set_local_timeouts(worker, settings, task.name)
                deleted, highest = db.delete_batch(worker, table, due, walk, progress.low_water, limit)
            log.debug("batch", rows=deleted, duration_ms=round((time.monotonic() - batch_started) * 1000, 1))
            progress.rows += deleted
            progress.batches += 1
            if highest is not None:
                progress.low_water = highest
            _report_progress(progress, on_progress, log, started)
            if deleted < limit:
                break  # nothing left that is due and not locked by someone else
            if settings.max_rows is not None and progress.rows >= settings.max_rows:
                progress.stopped_by = "max_rows"
                break
            if settings.max_runtime_s is not None and time.monotonic() - started >= settings.max_runtime_s:
                progress.stopped_by = "max_runtime"
                break
            if settings.sleep_ms:
                time.sleep(settings.sleep_ms / 1000)
        with worker.begin():
            progress.remaining = worker.scalar(sa.select(sa.func.count()).select_from(table).where(due))


def _report_progress(progress: Progress, on_progress, log, started: float) -> None:
    if on_progress is not None:
        on_progress(progress.rows, progress.estimated_total)
    now = time.monotonic()
    if now - progress._last_log >= PROGRESS_LOG_INTERVAL_S:
        progress._last_log = now
        elapsed = now - started
        log.info("progress", rows=progress.rows, batches=progress.batches,
                 rows_per_s=round(progress.rows / elapsed) if elapsed else None)
