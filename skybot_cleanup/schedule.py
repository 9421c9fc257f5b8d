"""What the registry's cron schedules mean in time, and how each scheduler spells them.

Schedules are standard five-field cron expressions, always UTC. Extensions that only
some schedulers understand (L, W, #) are refused when the registry loads, so every
deploy format can express every schedule.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import islice

from cronsim import CronSim, CronSimError

from skybot_cleanup.vocabulary import Health, RunStatus

_ANCHOR = datetime(2000, 1, 3, tzinfo=UTC)  # a Monday
_WEEKDAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")


def parse(schedule: str) -> CronSim:
    """A validated schedule, or ValueError saying what is wrong with it."""
    if len(schedule.split()) != 5:
        raise ValueError(f"schedule {schedule!r} must have exactly five fields")
    try:
        cron = CronSim(schedule, _ANCHOR)
    except CronSimError as exc:
        raise ValueError(f"schedule {schedule!r} is not a valid cron expression: {exc}") from None
    if any(not isinstance(day, int) or day < 1 for day in cron.days) or any(
        not isinstance(day, int) for day in cron.weekdays
    ):
        raise ValueError(f"schedule {schedule!r} uses L, W or #, which systemd and Kubernetes cannot express")
    return cron


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def next_runs(schedule: str, after: datetime, count: int = 1) -> list[datetime]:
    """The next `count` run times strictly after `after`, in UTC."""
    return list(islice(CronSim(schedule, _aware(after)), count))


@cache
def interval(schedule: str) -> timedelta:
    """The longest gap between two runs (over up to a year): 1 h for hourly, 1 day for daily.

    The longest, not the first: "overdue" must not fire in the long gap of an
    irregular schedule (weekdays only, say)."""
    return max(_gaps(schedule))


@cache
def shortest_interval(schedule: str) -> timedelta:
    """The shortest gap between two runs: how long one run may take before the next is due."""
    return min(_gaps(schedule))


def _gaps(schedule: str) -> list[timedelta]:
    cron = CronSim(schedule, _ANCHOR)
    first = previous = next(cron)
    gaps = []
    for moment in islice(cron, 1000):
        gaps.append(moment - previous)
        previous = moment
        if moment - first > timedelta(days=400):
            break
    return gaps


def is_overdue(schedule: str, last_success: datetime, now: datetime) -> bool:
    """No success within two of its scheduled intervals."""
    return _aware(now) - _aware(last_success) > 2 * interval(schedule)


def to_oncalendar(schedule: str) -> list[str]:
    """The schedule as systemd OnCalendar= expressions, pinned to UTC.

    Cron runs a job when the day of month OR the weekday matches if both are
    restricted; OnCalendar requires both, so that case becomes two expressions.
    """
    cron = parse(schedule)
    _minute, _hour, day_field, _month, weekday_field = schedule.split()

    def values(numbers: set[int], width: int = 2) -> str:
        return ",".join(f"{n:0{width}d}" for n in sorted(numbers))

    def everything(numbers: set[int], full: range) -> bool:
        return set(numbers) >= set(full)

    minutes = "*" if everything(cron.minutes, range(60)) else values(cron.minutes)
    hours = "*" if everything(cron.hours, range(24)) else values(cron.hours)
    months = "*" if everything(cron.months, range(1, 13)) else values(cron.months)
    days = "*" if everything(cron.days, range(1, 32)) else values(cron.days)
    weekday_numbers = {day % 7 for day in cron.weekdays if isinstance(day, int)}  # parse() refused the rest
    weekdays = "" if weekday_numbers == set(range(7)) else ",".join(_WEEKDAYS[d] for d in sorted(weekday_numbers))
    time_part = f"{hours}:{minutes}:00 UTC"
    if weekdays and days != "*" and not (day_field.startswith("*") or weekday_field.startswith("*")):
        return [f"*-{months}-{days} {time_part}", f"{weekdays} *-{months}-* {time_part}"]
    prefix = f"{weekdays} " if weekdays else ""
    return [f"{prefix}*-{months}-{days} {time_part}"]


def describe(schedule: str) -> str:
    """A short phrase for help texts: "hourly at :00", "daily at 02:00", or the expression."""
    minute, hour, day, month, weekday = schedule.split()
    if (day, month, weekday) == ("*", "*", "*") and minute.isdigit():
        if hour == "*":
            return f"hourly at :{int(minute):02d} UTC"
        if hour.isdigit():
            return f"daily at {int(hour):02d}:{int(minute):02d} UTC"
    if (hour, day, month, weekday) == ("*", "*", "*", "*") and minute.startswith("*/"):
        return f"every {minute[2:]} minutes"
    return f"cron {schedule!r} (UTC)"


def health(
    schedule: str,
    *,
    last_success: datetime | None,
    last_status: str | None,
    first_seen: datetime | None,
    now: datetime,
    grace: timedelta,
) -> Health:
    """OK, PENDING, OVERDUE or FAILING, for a job with this schedule and history.

    FAILING: its newest real run did not succeed. OK: a success within two intervals.
    PENDING: never succeeded, but its first scheduled run after the tool first saw
    the database (plus the grace) has not come yet: a fresh install is not red.
    OVERDUE: anything else.
    """
    if last_status is not None and last_status != RunStatus.OK:
        return Health.FAILING
    if last_success is not None:
        return Health.OVERDUE if is_overdue(schedule, last_success, now) else Health.OK
    first_due = next_runs(schedule, first_seen or now)[0] + grace
    return Health.PENDING if _aware(now) <= first_due else Health.OVERDUE
