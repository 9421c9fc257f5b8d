"""What the registry's cron schedules mean in time: next runs, intervals, overdue."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import islice

from cronsim import CronSim


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def next_runs(schedule: str, after: datetime, count: int = 1) -> list[datetime]:
    """The next `count` run times after `after`, in UTC (schedules are always UTC)."""
    return list(islice(CronSim(schedule, _aware(after)), count))


def interval(schedule: str, now: datetime) -> timedelta:
    """The gap between the next two runs: 1 h for hourly, 1 day for daily."""
    first, second = next_runs(schedule, now, 2)
    return second - first


def is_overdue(schedule: str, last_success: datetime | None, now: datetime) -> bool:
    """No success within two of its scheduled intervals (or never a success at all)."""
    if last_success is None:
        return True
    return _aware(now) - _aware(last_success) > 2 * interval(schedule, now)
