"""Running a cleanup task: the library API behind every CLI verb."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import structlog

from skybot_cleanup import db
from skybot_cleanup.errors import EXIT_OK, Interrupted, classify
from skybot_cleanup.logs import get_logger
from skybot_cleanup.settings import BaseCleanupSettings
from skybot_cleanup.tasks import Task


def utc_now() -> datetime:
    """Now as naive UTC at millisecond precision: the form of Prisma's timestamp(3) columns.

    Naive matters: psycopg sends it as `timestamp`, compared as is with the column.
    An aware datetime (or SQL now()) would go through the session's time zone and
    shift the cutoff by its offset.
    """
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def iso_utc(moment: datetime) -> str:
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
    error_class: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def database_target(settings: BaseCleanupSettings) -> db.DatabaseTarget:
    """The configured database; raises ConfigError when there is none or it is malformed."""
    url = settings.database_url.get_secret_value() if settings.database_url else None
    return db.parse_database_url(url, settings.schema_name)


def run_task(settings: BaseCleanupSettings, task: Task, *, dry_run: bool = False,
             now: datetime | None = None, run_id: str | None = None) -> RunResult:
    """Run one task as one transaction and report what happened; never raises for
    expected failures (they become the result's status and exit code)."""
    started = time.monotonic()
    run_id = run_id or uuid.uuid4().hex[:12]
    now = now or utc_now()
    cutoff = task.cutoff(now, settings)
    # A cutoff after now would delete rows that are still valid.
    assert cutoff <= now, "cutoff in the future"
    log = get_logger()
    rows = 0
    target = None
    with structlog.contextvars.bound_contextvars(task=task.name, run_id=run_id):
        try:
            target = database_target(settings)
            engine = db.create_engine(target, settings, task.name)
            try:
                rows = _delete_or_count(engine, settings, target, task, cutoff, dry_run)
            finally:
                engine.dispose()
            status, exit_code, error_class, error = "ok", EXIT_OK, None, None
        except (Exception, Interrupted) as exc:
            failure = classify(exc, secrets=(target.password,) if target and target.password else ())
            status, exit_code = failure.status, failure.exit_code
            error_class, error = failure.error_class, failure.message
            event = {"skipped": "run_skipped", "interrupted": "interrupted"}.get(status, "run_failed")
            (log.warning if status == "skipped" else log.error)(
                event, error_class=error_class, error=error, rows=rows
            )
        result = RunResult(
            task=task.name, status=status, dry_run=dry_run, rows=rows, cutoff=iso_utc(cutoff),
            duration_ms=round((time.monotonic() - started) * 1000), run_id=run_id,
            exit_code=exit_code, error_class=error_class, error=error,
        )
        log.info("run_finished", status=status, rows=rows, dry_run=dry_run,
                 cutoff=result.cutoff, duration_ms=result.duration_ms, exit_code=exit_code)
    return result


def _delete_or_count(engine, settings, target, task: Task, cutoff: datetime, dry_run: bool) -> int:
    import sqlalchemy as sa

    with db.transaction(engine, settings, label=task.name, lock=None if dry_run else task.name,
                        read_only=dry_run) as conn:
        table, columns = db.bind_table(conn, settings, target.schema, task.table)
        due = task.due(columns, cutoff)
        if dry_run:
            return conn.scalar(sa.select(sa.func.count()).select_from(table).where(due))
        return conn.execute(sa.delete(table).where(due)).rowcount
