"""`skybot-cleanup status`: is every job running, succeeding and keeping up?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from skybot_cleanup import history, metrics
from skybot_cleanup.clock import iso_utc
from skybot_cleanup.errors import ConfigError
from skybot_cleanup.schedule import health, next_runs
from skybot_cleanup.settings import CleanupSettings
from skybot_cleanup.tasks import REGISTRY, Registry

HEALTHY = ("OK", "PENDING")


@dataclass
class JobStatus:
    task: str
    schedule: str
    health: str  # OK | PENDING | OVERDUE | FAILING
    last_success_at: str | None
    last_success_rows: int | None
    last_failure_at: str | None
    last_failure_error: str | None
    next_run_at: str
    due_rows: int | None
    due_rows_estimated: bool = False
    error: str | None = None  # the task could not be checked (missing table): FAILING

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Status:
    jobs: list[JobStatus]
    grace_minutes: int
    history_available: bool

    @property
    def healthy(self) -> bool:
        return all(job.health in HEALTHY for job in self.jobs)


def collect(
    conn: sa.Connection, settings: CleanupSettings, schema: str | None, now: datetime, registry: Registry = REGISTRY
) -> Status:
    state = history.read_state(conn, settings, [task.name for task in registry.tasks])
    bound = metrics.bind_all(conn, settings, schema, registry)
    grace = timedelta(minutes=settings.grace_minutes)
    # Without history nothing is known: no job may pass for PENDING forever.
    first_seen = state.first_seen if settings.history else datetime(1970, 1, 1)
    jobs = []
    for task in registry.tasks:
        past = state.tasks[task.name]
        judged = health(
            task.schedule,
            last_success=past.last_success_at,
            last_status=past.last_status,
            first_seen=first_seen,
            now=now,
            grace=grace,
        )
        job = JobStatus(
            task=task.name,
            schedule=task.schedule,
            health=judged,
            last_success_at=iso_utc(past.last_success_at),
            last_success_rows=past.last_success_rows,
            last_failure_at=iso_utc(past.last_failure_at),
            last_failure_error=past.last_failure_error,
            next_run_at=_next(task.schedule, now),
            due_rows=None,
        )
        table = bound[task.table.key]
        if isinstance(table, ConfigError):
            job.health, job.error = "FAILING", str(table)
        else:
            backlog = metrics.task_backlog(conn, task, table, metrics.cutoff_of(task, settings, now))
            job.due_rows, job.due_rows_estimated = backlog.due.value, backlog.due.estimated
        jobs.append(job)
    # The metrics job succeeds when a snapshot is recorded: judge it by the newest one.
    jobs.append(
        JobStatus(
            task=registry.metrics.name,
            schedule=registry.metrics.schedule,
            health=health(
                registry.metrics.schedule,
                last_success=state.last_snapshot_at,
                last_status=None,
                first_seen=first_seen,
                now=now,
                grace=grace,
            ),
            last_success_at=iso_utc(state.last_snapshot_at),
            last_success_rows=None,
            last_failure_at=None,
            last_failure_error=None,
            next_run_at=_next(registry.metrics.schedule, now),
            due_rows=None,
        )
    )
    return Status(jobs=jobs, grace_minutes=settings.grace_minutes, history_available=state.available)


def _next(schedule: str, now: datetime) -> str:
    return next_runs(schedule, now)[0].strftime("%Y-%m-%dT%H:%M:%SZ")


def render_table(status: Status) -> str:
    header = (
        f"{'job':<18}{'schedule':<13}{'health':<9}{'last success':<26}{'rows':>8}  "
        f"{'next run':<22}{'due now':>9}  last failure"
    )
    lines = [header]
    for job in status.jobs:
        if job.error:
            failure = job.error
        elif job.last_failure_at:
            failure = f"{job.last_failure_at} {job.last_failure_error}"
        else:
            failure = "-"
        rows = "-" if job.last_success_rows is None else f"{job.last_success_rows:,}"
        due = "-" if job.due_rows is None else f"{'~' if job.due_rows_estimated else ''}{job.due_rows:,}"
        lines.append(
            f"{job.task:<18}{job.schedule:<13}{job.health:<9}{job.last_success_at or 'never':<26}"
            f"{rows:>8}  {job.next_run_at:<22}{due:>9}  {failure}"
        )
    lines.append(
        f"(PENDING: never run yet, and not due before its first scheduled time plus a grace of "
        f"{status.grace_minutes} min; SKYBOT_CLEANUP_GRACE_MINUTES)"
    )
    return "\n".join(lines)
