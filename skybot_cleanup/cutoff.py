"""A run's one "now", and the cutoff each task deletes below: the one definition that
runs, dry runs, `metrics`, `status` and `check` all use.

A row is deleted only when it is due by every clock that matters, so a host clock that
runs ahead can never make a row that is still valid look expired.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from skybot_cleanup.clock import naive_utc, utc_now
from skybot_cleanup.registry import Task

if TYPE_CHECKING:
    from skybot_cleanup.settings import Settings


@dataclass(frozen=True)
class RunTime:
    """The clocks a run read, and the now it takes from them."""

    host: datetime  # naive UTC, milliseconds
    server: datetime | None = None  # the database server's clock, read in the run's first transaction

    @property
    def now(self) -> datetime:
        return self.host if self.server is None else min(self.host, self.server)

    @property
    def record_now(self) -> datetime:
        """The now every record is stamped with and every report judges by: the server's,
        when read (the history lives there, and no host clock may date or prune it)."""
        return self.server or self.host

    @property
    def skew_s(self) -> float | None:
        """How far the host's clock is ahead of the server's (negative: behind)."""
        return None if self.server is None else round((self.host - self.server).total_seconds(), 3)


def run_time(server: datetime | None = None, host: datetime | None = None) -> RunTime:
    return RunTime(host=naive_utc(host) if host else utc_now(), server=naive_utc(server) if server else None)


def cutoff(task: Task, now: datetime, settings: Settings) -> datetime:
    """Rows whose age column is below this are due (with the task's other conditions)."""
    moment = now - timedelta(days=settings.retention_days(task)) if task.retention else now
    if moment > now:  # never reachable through settings; a guard against edits
        raise ValueError(f"{task.name}: cutoff {moment} is in the future and would delete live rows")
    return moment
