"""`skybot-cleanup status`: is every job running, succeeding and keeping up?"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from skybot_cleanup import health
from skybot_cleanup.clock import iso_utc
from skybot_cleanup.registry import Task
from skybot_cleanup.schedule import next_runs
from skybot_cleanup.settings import Settings
from skybot_cleanup.vocabulary import Health


@dataclass
class JobStatus:
    task: str
    schedule: str
    health: Health
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
    history_refused: str | None = None
    role_beyond_need: list[str] = field(default_factory=list)  # what the role holds beyond a cleanup's needs

    @property
    def healthy(self) -> bool:
        return all(job.health.healthy for job in self.jobs)


def render(judgement: health.Judgement, settings: Settings, now: datetime) -> Status:
    """Every job's line of `status`, from the one judgement."""
    jobs = []
    for judged in judgement.jobs:
        job, past, backlog = judged.job, judged.past, judged.backlog
        due = backlog.due if backlog is not None else None
        jobs.append(
            JobStatus(
                task=job.name,
                schedule=job.schedule,
                health=judged.health,
                last_success_at=iso_utc(past.last_success_at),
                last_success_rows=past.last_success_rows if isinstance(job, Task) else None,
                last_failure_at=iso_utc(past.last_failure_at),
                last_failure_error=past.last_failure_error,
                next_run_at=iso_utc(next_runs(job.schedule, now)[0]) or "",
                due_rows=due.value if due is not None else None,
                due_rows_estimated=due.estimated if due is not None else False,
                error=judged.problem,
            )
        )
    state = judgement.state
    return Status(
        jobs=jobs,
        grace_minutes=settings.grace_minutes,
        history_available=state.available,
        first_seen=state.first_seen,
        history_refused=judgement.history_refused,
        role_beyond_need=judgement.role_beyond_need,
    )
