"""The task registry: the one place that says what each job deletes and when it runs.

The CLI, the settings, the docs, the deploy/ schedules and the tests are all driven
from the declarations below, so adding a task means adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # SQLAlchemy is imported lazily: `--help` and `--version` stay fast.
    from sqlalchemy import ColumnElement


@dataclass(frozen=True)
class TableSpec:
    """One of the app's tables, with the columns the tool reads (default names)."""

    key: str
    default_name: str
    columns: dict[str, tuple[str, str]]  # logical name -> (default column name, type)


TABLES: dict[str, TableSpec] = {
    spec.key: spec
    for spec in (
        TableSpec(
            "idempotency_key",
            "IdempotencyKey",
            {
                "id": ("id", "text"),
                "expires_at": ("expiresAt", "timestamp"),
                "created_at": ("createdAt", "timestamp"),
                "status_code": ("statusCode", "integer"),
            },
        ),
        TableSpec(
            "refresh_token",
            "RefreshToken",
            {
                "id": ("id", "text"),
                "expires_at": ("expiresAt", "timestamp"),
                "revoked_at": ("revokedAt", "timestamp"),
            },
        ),
        TableSpec(
            "magic_link",
            "MagicLink",
            {
                "id": ("id", "text"),
                "expires_at": ("expiresAt", "timestamp"),
                "used": ("used", "boolean"),
            },
        ),
    )
}

Columns = dict[str, Any]  # logical name -> sqlalchemy Column of the bound table


@dataclass(frozen=True)
class Job:
    """Anything the schedulers run: a cleanup task or the metrics snapshot."""

    name: str
    schedule: str  # five-field cron expression, always UTC
    summary: str


@dataclass(frozen=True)
class Task(Job):
    table: str = ""
    rule: str = ""  # the deletion rule in words, for --help and the README
    due: Callable[[Columns, datetime], "ColumnElement[bool]"] = field(default=lambda c, cutoff: None)
    # Batches walk this column in order; it must be indexed (or be the primary key).
    walk_column: str = "expires_at"
    # The timestamp compared with the cutoff: how long the oldest due row has been due.
    age_column: str = "expires_at"
    # Name of the setting holding a retention in days; the cutoff is now minus it.
    retention_setting: str | None = None

    def cutoff(self, now: datetime, settings: Any) -> datetime:
        if self.retention_setting is None:
            return now
        return now - timedelta(days=getattr(settings, self.retention_setting))


def _or(*clauses):
    from sqlalchemy import or_

    return or_(*clauses)


TASKS: tuple[Task, ...] = (
    Task(
        name="idempotency-keys",
        schedule="0 * * * *",
        summary="Delete idempotency keys whose expiry has passed.",
        table="idempotency_key",
        rule='"IdempotencyKey" rows with "expiresAt" < now',
        due=lambda c, cutoff: c["expires_at"] < cutoff,
    ),
    Task(
        name="refresh-tokens",
        schedule="0 * * * *",
        summary="Delete expired refresh tokens that were never revoked.",
        table="refresh_token",
        rule='"RefreshToken" rows with "expiresAt" < now and "revokedAt" IS NULL '
        "(revoked tokens are audit records: revoked-tokens removes them)",
        due=lambda c, cutoff: (c["expires_at"] < cutoff) & c["revoked_at"].is_(None),
    ),
    Task(
        name="magic-links",
        schedule="0 2 * * *",
        summary="Delete magic links that are expired or used.",
        table="magic_link",
        rule='"MagicLink" rows with "expiresAt" < now or "used"',
        # `= true`, not `IS TRUE`: only the former can use an index.
        due=lambda c, cutoff: _or(c["expires_at"] < cutoff, c["used"] == True),  # noqa: E712
        # "used" rows may expire in the future, so no timestamp order covers every
        # due row; the primary key does (and is the only index besides email/token).
        walk_column="id",
    ),
    Task(
        name="revoked-tokens",
        schedule="0 3 * * *",
        summary="Delete refresh tokens revoked longer ago than the audit retention.",
        table="refresh_token",
        rule='"RefreshToken" rows with "revokedAt" < now - retention (default 90 days)',
        due=lambda c, cutoff: c["revoked_at"] < cutoff,
        walk_column="revoked_at",
        age_column="revoked_at",
        retention_setting="revoked_retention_days",
    ),
)

METRICS = Job(
    name="metrics",
    schedule="*/5 * * * *",
    summary="Measure backlogs, active sessions and table health; delete nothing.",
)

JOBS: tuple[Job, ...] = (*TASKS, METRICS)

TASKS_BY_NAME = {task.name: task for task in TASKS}
