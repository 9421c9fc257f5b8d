"""`skybot-cleanup status`: is every job running, succeeding and keeping up?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from skybot_cleanup import db, history
from skybot_cleanup.clock import iso_utc
from skybot_cleanup.cutoff import cutoff
from skybot_cleanup.errors import ConfigError
from skybot_cleanup.registry import REGISTRY, Registry, Task
from skybot_cleanup.schedule import next_runs
from skybot_cleanup.settings import CleanupSettings

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
    bound = db.bind_all(conn, schema, registry, settings.all_table_names(registry))
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
            elif table.info.rls_warning:
                entry.error = f"backlog not measurable: {table.info.rls_warning}"
            else:
                backlog = db.task_backlog(conn, job, table, cutoff(job, now, settings))
                entry.due_rows, entry.due_rows_estimated = backlog.due.value, backlog.due.estimated
        jobs.append(entry)
    return Status(
        jobs=jobs, grace_minutes=settings.grace_minutes, history_available=state.available, first_seen=state.first_seen
    )
