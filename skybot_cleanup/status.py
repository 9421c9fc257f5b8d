"""`skybot-cleanup status`: is every job running, succeeding and keeping up?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from skybot_cleanup import history, metrics
from skybot_cleanup.clock import iso_utc
from skybot_cleanup.errors import ConfigError
from skybot_cleanup.schedule import next_runs
from skybot_cleanup.settings import CleanupSettings
from skybot_cleanup.tasks import REGISTRY, Registry, Task

HEALTHY = ("OK", "PENDING")


@dataclass
class JobStatus:
    task: str
    schedule: str
    health: str  # OK | PENDING | OVERDUE | FAILING | UNKNOWN
    last_success_at: str | None
    last_success_rows: int | None
    last_failure_at: str | None
    last_failure_error: str | None
    next_run_at: str
    due_rows: int | None
    due_rows_estimated: bool = False
    error: str | None = None  # why the job could not be judged, or its table is missing

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Status:
    jobs: list[JobStatus]
    grace_minutes: int
    history_available: bool
    first_seen: datetime | None = None

    @property
    def healthy(self) -> bool:
        return all(job.health in HEALTHY for job in self.jobs)


def collect(
    conn: sa.Connection,
    settings: CleanupSettings,
    schema: str | None,
    now: datetime,
    registry: Registry = REGISTRY,
    spooled: Sequence[dict[str, Any]] = (),
    unknown: str | None = None,
) -> Status:
    """Every job's health. `unknown` says why the history cannot tell (it is off, or
    cannot be read or written): then a job is UNKNOWN, never green by default."""
    names = [job.name for job in registry.jobs]
    state = history.read_state(conn, settings, names, spooled)
    bound = metrics.bind_all(conn, settings, schema, registry)
    grace = timedelta(minutes=settings.grace_minutes)
    jobs = []
    for job in registry.jobs:
        past = state.tasks[job.name]
        if job is registry.metrics and past.last_success_at is None:
            # Tables made before metrics runs were recorded: its newest snapshot is its last success.
            past.last_success_at = state.last_snapshot_at
        judged = state.health(job.name, job.schedule, now, grace)
        entry = JobStatus(
            task=job.name,
            schedule=job.schedule,
            health=judged,
            last_success_at=iso_utc(past.last_success_at),
            last_success_rows=past.last_success_rows if job is not registry.metrics else None,
            last_failure_at=iso_utc(past.last_failure_at),
            last_failure_error=past.last_failure_error,
            next_run_at=iso_utc(next_runs(job.schedule, now)[0]) or "",
            due_rows=None,
        )
        if unknown and judged != "FAILING":
            entry.health, entry.error = "UNKNOWN", unknown
        if isinstance(job, Task):
            table = bound[job.table.key]
            if isinstance(table, ConfigError):
                entry.health, entry.error = "FAILING", str(table)
            else:
                backlog = metrics.task_backlog(conn, job, table, metrics.cutoff_of(job, settings, now))
                entry.due_rows, entry.due_rows_estimated = backlog.due.value, backlog.due.estimated
        jobs.append(entry)
    return Status(
        jobs=jobs, grace_minutes=settings.grace_minutes, history_available=state.available, first_seen=state.first_seen
    )


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
        f"{status.grace_minutes} min, SKYBOT_CLEANUP_GRACE_MINUTES; UNKNOWN: no run history to judge by)"
    )
    return "\n".join(lines)
