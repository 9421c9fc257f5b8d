"""The registry: the one place that says which tables the app has, what each job
deletes or measures, and when it runs.

The CLI, the settings, the docs, the deploy/ files, the monitoring pack, the test
and demo schema and the tests are all driven from the declarations below, so adding
a task means adding one `Task` (and its `TableSpec`) here, plus its seed cases in
tests/cases.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from skybot_cleanup import schedule as cron

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

ColumnType = Literal["text", "timestamp", "integer", "boolean", "jsonb"]
# Quoted identifiers could hold anything, but Prisma names (and their @@map renames)
# never need more than this, and a strict pattern keeps typos obvious.
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$"


@dataclass(frozen=True, kw_only=True)
class Column:
    """A column of the app's table, as its Prisma migrations create it."""

    name: str
    type: ColumnType
    nullable: bool = False
    default: str | None = None  # SQL default Prisma declares: "CURRENT_TIMESTAMP", "false"
    # Set when the tool reads the column: its logical name, which is also the
    # setting that renames it (SKYBOT_CLEANUP_<TABLE KEY>_<ROLE>_COLUMN).
    role: str | None = None


@dataclass(frozen=True, kw_only=True)
class ForeignKey:
    column: str
    references: str  # the parent table; its key column is "id"


@dataclass(frozen=True, kw_only=True)
class TableSpec:
    """One of the app's tables. Index and constraint names follow Prisma's rules
    ("<Model>_<column>_idx", "_key", "_pkey", "_fkey")."""

    key: str  # settings prefix: SKYBOT_CLEANUP_<KEY>_TABLE
    name: str  # the default (Prisma model) name
    columns: tuple[Column, ...]
    unique: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()
    foreign_keys: tuple[ForeignKey, ...] = ()

    @property
    def roles(self) -> dict[str, Column]:
        """The columns the tool reads, by logical name."""
        return {column.role: column for column in self.columns if column.role}


Columns = Mapping[str, "ColumnElement[object]"]  # logical name -> the bound column
Predicate = Callable[[Columns, datetime], "ColumnElement[bool]"]


@dataclass(frozen=True, kw_only=True)
class Retention:
    """A task whose cutoff is now minus a number of days, which is a setting."""

    setting: str  # field name: SKYBOT_CLEANUP_<SETTING>
    default_days: int
    description: str


@dataclass(frozen=True, kw_only=True)
class Job:
    """Anything the schedulers run: a cleanup task or the metrics snapshot."""

    name: str
    schedule: str  # five-field cron expression, always UTC
    summary: str

    def __post_init__(self) -> None:
        try:
            cron.parse(self.schedule)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class Task(Job):
    table: TableSpec
    rule: str  # the deletion rule in words, for --help and the README
    due: Predicate
    # The indexed column whose order batches follow when few rows are due (the index
    # walk); a big backlog walks the heap instead. None: the due predicate can use no
    # index, so batches always walk the heap.
    walk_column: str | None = "expires_at"
    # The timestamp compared with the cutoff: how long the oldest due row has been due.
    age_column: str = "expires_at"
    retention: Retention | None = None
    # When the due predicate narrows the walk column's range further (refresh-tokens
    # leaves revoked tokens, kept 90 days for audit), every hourly count reads the rows it
    # leaves: an index on these columns (by role), in this order, reads only due ones.
    # `check` measures what the walk passes over and advises it in schema.prisma.
    narrowing_index: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for role in (self.walk_column, self.age_column, *(self.narrowing_index or ())):
            if role is not None and role not in self.table.roles:
                raise ValueError(f"{self.name}: {self.table.name} has no column with role {role!r}")


@dataclass(frozen=True, kw_only=True)
class Measure:
    """A count the metrics job reports (besides each task's backlog)."""

    name: str  # metric skybot_cleanup_<name>, JSON key <name>
    help: str
    table: TableSpec
    # (columns, now, stuck threshold) -> which rows to count; bounded by an index.
    where: Callable[[Columns, datetime, timedelta], ColumnElement[bool]]


@dataclass(frozen=True)
class Registry:
    tasks: tuple[Task, ...]
    metrics: Job
    measures: tuple[Measure, ...] = ()

    @cached_property
    def jobs(self) -> tuple[Job, ...]:
        return (*self.tasks, self.metrics)

    @cached_property
    def tables(self) -> tuple[TableSpec, ...]:
        """Every table a task or measure reads, once, in registry order."""
        seen: dict[str, TableSpec] = {}
        for spec in [task.table for task in self.tasks] + [measure.table for measure in self.measures]:
            seen.setdefault(spec.key, spec)
        return tuple(seen.values())

    def task(self, name: str) -> Task:
        return next(task for task in self.tasks if task.name == name)


def _timestamp(name: str, *, nullable: bool = False, role: str | None = None, default: str | None = None) -> Column:
    return Column(name=name, type="timestamp", nullable=nullable, role=role, default=default)


def _text(name: str, *, nullable: bool = False, role: str | None = None) -> Column:
    return Column(name=name, type="text", nullable=nullable, role=role)


NOW = "CURRENT_TIMESTAMP"

IDEMPOTENCY_KEY = TableSpec(
    key="idempotency_key",
    name="IdempotencyKey",
    columns=(
        _text("id", role="id"),
        _text("key"),
        _text("accountId"),
        _text("endpoint"),
        _text("method"),
        Column(name="requestBody", type="jsonb", nullable=True),
        Column(name="responseBody", type="jsonb", nullable=True),
        Column(name="statusCode", type="integer", nullable=True, role="status_code"),
        _timestamp("createdAt", default=NOW, role="created_at"),
        _timestamp("expiresAt", role="expires_at"),
    ),
    unique=("key",),
    indexes=("accountId", "expiresAt", "key", "statusCode"),
    foreign_keys=(ForeignKey(column="accountId", references="Account"),),
)

REFRESH_TOKEN = TableSpec(
    key="refresh_token",
    name="RefreshToken",
    columns=(
        _text("id", role="id"),
        _text("token"),
        _text("userAccountId"),
        _text("accountId"),
        _timestamp("expiresAt", role="expires_at"),
        _timestamp("revokedAt", nullable=True, role="revoked_at"),
        _text("revokedReason", nullable=True),
        Column(name="deviceInfo", type="jsonb", nullable=True),
        _text("ipAddress", nullable=True),
        _text("userAgent", nullable=True),
        _timestamp("lastUsedAt", default=NOW),
        _timestamp("createdAt", default=NOW),
        _timestamp("updatedAt"),  # no default: Prisma's @updatedAt sets it
    ),
    unique=("token",),
    indexes=("token", "userAccountId", "accountId", "expiresAt", "revokedAt"),
    foreign_keys=(
        ForeignKey(column="accountId", references="Account"),
        ForeignKey(column="userAccountId", references="UserAccount"),
    ),
)

MAGIC_LINK = TableSpec(
    key="magic_link",
    name="MagicLink",
    columns=(
        _text("id", role="id"),
        _text("email"),
        _text("token"),
        _timestamp("expiresAt", role="expires_at"),
        Column(name="used", type="boolean", default="false", role="used"),
        _timestamp("createdAt", default=NOW),
    ),
    unique=("token",),
    indexes=("token", "email"),  # nothing on "expiresAt" or "used": see `check`
)


def _or(*clauses: ColumnElement[bool]) -> ColumnElement[bool]:
    from sqlalchemy import or_

    return or_(*clauses)


def _and(*clauses: ColumnElement[bool]) -> ColumnElement[bool]:
    from sqlalchemy import and_

    return and_(*clauses)


TASKS: tuple[Task, ...] = (
    Task(
        name="idempotency-keys",
        schedule="0 * * * *",
        summary="Delete idempotency keys whose expiry has passed.",
        table=IDEMPOTENCY_KEY,
        rule='"IdempotencyKey" rows with "expiresAt" < now',
        due=lambda c, cutoff: c["expires_at"] < cutoff,
    ),
    Task(
        name="refresh-tokens",
        schedule="0 * * * *",
        summary="Delete expired refresh tokens that were never revoked.",
        table=REFRESH_TOKEN,
        rule='"RefreshToken" rows with "expiresAt" < now and "revokedAt" IS NULL '
        "(revoked tokens are audit records: revoked-tokens removes them)",
        due=lambda c, cutoff: _and(c["expires_at"] < cutoff, c["revoked_at"].is_(None)),
        narrowing_index=("expires_at", "revoked_at"),
    ),
    Task(
        name="magic-links",
        schedule="0 2 * * *",
        summary="Delete magic links that are expired or used.",
        table=MAGIC_LINK,
        rule='"MagicLink" rows with "expiresAt" < now or "used"',
        due=lambda c, cutoff: _or(c["expires_at"] < cutoff, c["used"].is_(True)),
        # Used links may expire in the future, so no timestamp order covers every due
        # row, and the app declares no index on either column: always the heap walk.
        walk_column=None,
    ),
    Task(
        name="revoked-tokens",
        schedule="0 3 * * *",
        summary="Delete refresh tokens revoked longer ago than the audit retention.",
        table=REFRESH_TOKEN,
        rule='"RefreshToken" rows with "revokedAt" < now - retention (default 90 days)',
        due=lambda c, cutoff: c["revoked_at"] < cutoff,
        walk_column="revoked_at",
        age_column="revoked_at",
        retention=Retention(
            setting="revoked_retention_days",
            default_days=90,
            description="How long revoked refresh tokens are kept for audit before revoked-tokens deletes them.",
        ),
    ),
)

METRICS = Job(
    name="metrics",
    schedule="*/5 * * * *",
    summary="Measure backlogs, active sessions and table health; delete nothing.",
)

MEASURES: tuple[Measure, ...] = (
    Measure(
        name="active_sessions",
        help="Refresh tokens neither revoked nor expired.",
        table=REFRESH_TOKEN,
        where=lambda c, now, _stuck: _and(c["revoked_at"].is_(None), c["expires_at"] >= now),
    ),
    Measure(
        name="live_magic_links",
        help="Magic links neither used nor expired.",
        table=MAGIC_LINK,
        where=lambda c, now, _stuck: _and(c["used"].is_(False), c["expires_at"] >= now),
    ),
    # Only keys not yet expired: the index on expiresAt bounds the scan, and expired
    # keys are the idempotency-keys backlog.
    Measure(
        name="idempotency_keys_in_progress",
        help="Unexpired idempotency keys whose request has not finished.",
        table=IDEMPOTENCY_KEY,
        where=lambda c, now, _stuck: _and(c["status_code"].is_(None), c["expires_at"] >= now),
    ),
    Measure(
        name="idempotency_keys_stuck",
        help="In-progress idempotency keys older than SKYBOT_CLEANUP_IDEMPOTENCY_STUCK_MINUTES.",
        table=IDEMPOTENCY_KEY,
        where=lambda c, now, stuck: _and(
            c["status_code"].is_(None), c["expires_at"] >= now, c["created_at"] < now - stuck
        ),
    ),
)

REGISTRY = Registry(TASKS, METRICS, MEASURES)

# The parent tables the app's foreign keys point at, for the test and demo schema.
PARENT_TABLES: dict[str, tuple[ForeignKey, ...]] = {
    "Account": (),
    "UserAccount": (ForeignKey(column="accountId", references="Account"),),
}
