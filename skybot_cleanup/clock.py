"""Time in the one form the tool uses: naive UTC at millisecond precision, like the
app's Prisma columns (timestamp(3) without time zone, holding UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def utc_now() -> datetime:
    """Now as naive UTC at millisecond precision.

    Naive matters: psycopg sends it as `timestamp`, compared as is with the column.
    An aware datetime (or SQL now()) would go through the session's time zone and
    shift the cutoff by its offset.
    """
    return naive_utc(datetime.now(UTC))


def naive_utc(moment: datetime) -> datetime:
    """Any datetime as naive UTC, truncated to milliseconds; naive input is UTC already."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def iso_utc(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, milliseconds."""
    if moment is None:
        return None
    return naive_utc(moment).isoformat(timespec="milliseconds") + "Z"


def parse_iso(text: str) -> datetime:
    """The inverse of iso_utc (also accepts offsets and dates), as naive UTC."""
    return naive_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))


def epoch(moment: datetime) -> float:
    """Unix seconds; naive means UTC."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.timestamp()


def parse_duration(text: str) -> timedelta:
    """ "90s", "15m", "6h", "7d", "2w" -> timedelta; ValueError otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 6h, 7d)")
    return timedelta(seconds=int(text[:-1]) * units[text[-1]])


# Moments a command takes (history --since/--until) lie between these.
EARLIEST, LATEST = datetime(1970, 1, 1), datetime(9999, 12, 31, 23, 59, 59)


def parse_moment(text: str, now: datetime) -> datetime:
    """A duration before `now` (90m, 6h, 7d) or an ISO time, as naive UTC; ValueError
    when it is neither, or lies outside what a database timestamp holds."""
    try:
        try:
            moment = parse_iso(text)
        except ValueError:
            moment = now - parse_duration(text)
    except OverflowError:
        raise ValueError(f"out of range: {text!r}") from None
    if not EARLIEST <= moment <= LATEST:
        raise ValueError(f"out of range: {text!r}")
    return moment


def human_age(seconds: float | None) -> str:
    """A compact age for tables: 45s, 12.0m, 3.5h, 2.0d."""
    if not seconds:
        return "-"
    for unit, length in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}"
    return f"{seconds:.0f}s"
