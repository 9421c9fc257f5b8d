"""`skybot-cleanup status`: is every task running, succeeding and keeping up?"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from skybot_cleanup import history
from skybot_cleanup.cleanup import iso_utc
from skybot_cleanup.logs import get_logger
from skybot_cleanup.metrics import task_backlogs
from skybot_cleanup.schedule import is_overdue, next_runs
from skybot_cleanup.tasks import TASKS


def task_statuses(conn: sa.Connection, settings, schema: str | None, now: datetime) -> list[dict]:
    if not settings.history:
        get_logger().warning("history_disabled", hint="SKYBOT_CLEANUP_HISTORY is off: no run is known, "
                                                      "so every task shows OVERDUE")
    histories = history.task_histories(conn, settings, [task.name for task in TASKS])
    backlogs = task_backlogs(conn, settings, schema, now)
    statuses = []
    for task in TASKS:
        past = histories[task.name]
        due, _oldest_age = backlogs[task.name]
        # Failing: the newest real run (not a dry run, not a skip) did not succeed.
        failing = past.last_status is not None and past.last_status != "ok"
        overdue = is_overdue(task.schedule, past.last_success_at, now)
        statuses.append({
            "task": task.name,
            "schedule": task.schedule,
            "health": "FAILING" if failing else "OVERDUE" if overdue else "OK",
            "last_success_at": iso_utc(past.last_success_at),
            "last_success_rows": past.last_success_rows,
            "last_failure_at": iso_utc(past.last_failure_at),
            "last_failure_error": past.last_failure_error,
            "next_run_at": next_runs(task.schedule, now)[0].strftime("%Y-%m-%dT%H:%M:%SZ"),
            "due_rows": due,
        })
    return statuses


def render_table(statuses: list[dict]) -> str:
    header = (f"{'task':<18}{'schedule':<13}{'health':<9}{'last success':<26}{'rows':>8}  "
              f"{'next run':<22}{'due now':>9}  last failure")
    lines = [header]
    for s in statuses:
        failure = f"{s['last_failure_at']} {s['last_failure_error']}" if s["last_failure_at"] else "-"
        rows = "-" if s["last_success_rows"] is None else f"{s['last_success_rows']:,}"
        lines.append(f"{s['task']:<18}{s['schedule']:<13}{s['health']:<9}{s['last_success_at'] or 'never':<26}"
                     f"{rows:>8}  {s['next_run_at']:<22}{s['due_rows']:>9,}  {failure}")
    return "\n".join(lines)
