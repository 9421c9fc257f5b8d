"""Cron schedules: their meaning in time, systemd's spelling of them, and a job's health (schedule.py)."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from helpers import BASE, need

from skybot_cleanup import schedule
from skybot_cleanup.schedule import health


@pytest.mark.parametrize("cron", ["*/7 1-5 * 2 *", "15 3 * * 1-5", "0 0 1,15 * 1", "30 */6 * * sun", "0 12 L * *"])
def test_any_five_field_schedule_converts_to_oncalendar_or_is_refused(cron):
    """Cron's day-of-month OR weekday rule becomes two OnCalendar lines; systemd
    agrees with cronsim on the next runs of the union."""
    need("systemd-analyze")
    if "L" in cron.split()[2]:
        with pytest.raises(ValueError, match="L, W or #"):
            schedule.to_oncalendar(cron)
        return
    calendars = schedule.to_oncalendar(cron)
    runs: set[datetime] = set()
    for calendar in calendars:
        completed = subprocess.run(
            ["systemd-analyze", "calendar", "--iterations=12", f"--base-time={BASE:%Y-%m-%d %H:%M:%S} UTC", calendar],
            capture_output=True,
            text=True,
            env={"TZ": "UTC", "PATH": "/usr/bin:/bin"},
        )
        assert completed.returncode == 0, completed.stderr
        runs |= {
            datetime.fromisoformat(e).replace(tzinfo=UTC)
            for e in re.findall(
                r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", completed.stdout
            )
        }
    assert sorted(runs)[:12] == schedule.next_runs(cron, BASE, 12)


def test_a_registry_schedule_with_an_extension_is_refused_at_load():
    from skybot_cleanup.registry import Job

    with pytest.raises(ValueError, match="uses L, W or #"):
        Job(name="x", schedule="0 0 L * *", summary="")
    with pytest.raises(ValueError, match="exactly five fields"):
        Job(name="x", schedule="0 0 * * * *", summary="")


AT = datetime(2026, 11, 28, 12, 30)


@pytest.mark.parametrize(
    ("last_success", "last_status", "first_seen", "expected"),
    [
        (None, None, None, "PENDING"),  # a brand-new install
        (None, None, AT - timedelta(minutes=40), "PENDING"),  # first run at 13:00, grace till 13:30
        (None, None, AT - timedelta(hours=3), "OVERDUE"),  # its first scheduled run came and went
        (AT - timedelta(minutes=30), None, AT - timedelta(days=9), "OK"),
        (AT - timedelta(hours=2, minutes=1), "ok", AT - timedelta(days=9), "OVERDUE"),
        (AT - timedelta(minutes=30), "failed", AT - timedelta(days=9), "FAILING"),
        (None, "failed", None, "FAILING"),
    ],
)
def test_job_health(last_success, last_status, first_seen, expected):
    assert (
        health(
            "0 * * * *",
            last_success=last_success,
            last_status=last_status,
            first_seen=first_seen,
            now=AT,
            grace=timedelta(minutes=30),
        )
        == expected
    )
