"""Rows around every cutoff, and which task deletes which: the seed cases, and the checks,
the generic task tests run on (tests/test_tasks.py, and a fifth task in test_registry.py).
A new task adds its rows here and its expected deletions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from helpers import NOW

from skybot_cleanup.demo import idempotency_key_row, magic_link_row, refresh_token_row
from skybot_cleanup.registry import REGISTRY, Registry, Task
from skybot_cleanup.run import run_task
from skybot_cleanup.settings import Settings, load

MS = timedelta(milliseconds=1)
DAY = timedelta(days=1)
AUDIT = 90 * DAY  # the default retention of revoked tokens

SEED = {
    "IdempotencyKey": [
        idempotency_key_row("ik_expired_1ms_ago", NOW - MS),
        idempotency_key_row("ik_expired_long_ago", NOW - 400 * DAY),
        idempotency_key_row("ik_in_progress_expired", NOW - MS, status=None),
        idempotency_key_row("ik_expires_now", NOW),
        idempotency_key_row("ik_expires_in_1ms", NOW + MS),
        idempotency_key_row("ik_in_progress_live", NOW + DAY, status=None),
    ],
    "RefreshToken": [
        refresh_token_row("rt_expired_1ms_ago", NOW - MS),
        refresh_token_row("rt_expired_long_ago", NOW - 400 * DAY),
        refresh_token_row("rt_expires_now", NOW),
        refresh_token_row("rt_expires_in_1ms", NOW + MS),
        refresh_token_row("rt_live", NOW + 30 * DAY),
        # Revoked: audit records, whatever their expiry, until the retention passes.
        refresh_token_row("rt_expired_revoked_1d_ago", NOW - MS, revoked=NOW - DAY),
        refresh_token_row("rt_live_revoked_1ms_ago", NOW + DAY, revoked=NOW - MS),
        refresh_token_row("rt_revoked_audit_minus_1ms", NOW - 10 * DAY, revoked=NOW - AUDIT + MS),
        refresh_token_row("rt_revoked_exactly_audit", NOW - 10 * DAY, revoked=NOW - AUDIT),
        refresh_token_row("rt_revoked_audit_plus_1ms", NOW - 10 * DAY, revoked=NOW - AUDIT - MS),
        refresh_token_row("rt_unexpired_revoked_long_ago", NOW + DAY, revoked=NOW - 200 * DAY),
    ],
    "MagicLink": [
        magic_link_row("ml_expired_1ms_ago", NOW - MS),
        magic_link_row("ml_expires_now", NOW),
        magic_link_row("ml_expires_in_1ms", NOW + MS),
        magic_link_row("ml_used_live", NOW + DAY, used=True),
        magic_link_row("ml_used_expired", NOW - DAY, used=True),
        magic_link_row("ml_live", NOW + DAY),
    ],
}

DELETED = {
    "idempotency-keys": {"ik_expired_1ms_ago", "ik_expired_long_ago", "ik_in_progress_expired"},
    "refresh-tokens": {"rt_expired_1ms_ago", "rt_expired_long_ago"},
    "magic-links": {"ml_expired_1ms_ago", "ml_used_live", "ml_used_expired"},
    "revoked-tokens": {"rt_revoked_audit_plus_1ms", "rt_unexpired_revoked_long_ago"},
}


def all_ids(backend, seed=SEED) -> dict[str, set[str]]:
    return {table: backend.ids(table) for table in seed}


def seed(backend, rows=SEED) -> dict[str, set[str]]:
    for table, table_rows in rows.items():
        backend.insert(table, table_rows)
    return all_ids(backend, rows)


def expected_after(seeded: dict[str, set[str]], deleted: set[str]) -> dict[str, set[str]]:
    return {table: ids - deleted for table, ids in seeded.items()}


@dataclass
class Suite:
    registry: Registry = REGISTRY
    seed: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: SEED)
    deleted: dict[str, set[str]] = field(default_factory=lambda: DELETED)

    def settings(self, url: str, **overrides: Any) -> Settings:
        return load({"database_url": url, **overrides}, registry=self.registry).settings


DEFAULT = Suite()


def check_deletes_exactly_the_due_rows(backend, suite: Suite, task: Task, **overrides: Any) -> None:
    seeded = seed(backend, suite.seed)
    result = run_task(suite.settings(backend.url, **overrides), task, now=NOW)
    assert (result.status, result.exit_code, result.error) == ("ok", 0, None)
    assert result.rows == len(suite.deleted[task.name])
    assert all_ids(backend, suite.seed) == expected_after(seeded, suite.deleted[task.name])


def check_dry_run_counts_and_changes_nothing(backend, suite: Suite, task: Task) -> None:
    seeded = seed(backend, suite.seed)
    result = run_task(suite.settings(backend.url), task, dry_run=True, now=NOW)
    assert (result.status, result.dry_run, result.rows) == ("ok", True, len(suite.deleted[task.name]))
    assert all_ids(backend, suite.seed) == seeded


def check_second_run_deletes_nothing(backend, suite: Suite) -> None:
    seeded = seed(backend, suite.seed)
    settings = suite.settings(backend.url)
    first = {task.name: run_task(settings, task, now=NOW).rows for task in suite.registry.tasks}
    second = {task.name: run_task(settings, task, now=NOW).rows for task in suite.registry.tasks}
    assert first == {name: len(ids) for name, ids in suite.deleted.items()}
    assert second == dict.fromkeys(suite.deleted, 0)
    assert all_ids(backend, suite.seed) == expected_after(seeded, set().union(*suite.deleted.values()))


PARTITIONED_REFRESH_TOKEN = """
DROP TABLE "RefreshToken";
CREATE TABLE "RefreshToken" (
    id text NOT NULL, token text NOT NULL, "userAccountId" text NOT NULL, "accountId" text NOT NULL,
    "expiresAt" timestamp(3) NOT NULL, "revokedAt" timestamp(3), "revokedReason" text, "deviceInfo" jsonb,
    "ipAddress" text, "userAgent" text, "lastUsedAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP, "updatedAt" timestamp(3) NOT NULL,
    PRIMARY KEY (id, "expiresAt")
) PARTITION BY RANGE ("expiresAt");
CREATE INDEX ON "RefreshToken" ("expiresAt");
CREATE INDEX ON "RefreshToken" ("revokedAt");
CREATE TABLE "RefreshToken_old" PARTITION OF "RefreshToken" FOR VALUES FROM (MINVALUE) TO ('{old}');
CREATE TABLE "RefreshToken_recent" PARTITION OF "RefreshToken" FOR VALUES FROM ('{old}') TO ('{soon}');
CREATE TABLE "RefreshToken_future" PARTITION OF "RefreshToken" FOR VALUES FROM ('{soon}') TO (MAXVALUE);
"""
