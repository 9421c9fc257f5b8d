"""Rows around every cutoff, and which task deletes which: the seed cases the generic
task tests run on. A new task adds its rows here and its expected deletions."""

from __future__ import annotations

from datetime import timedelta

from conftest import NOW

from skybot_cleanup.demo import idempotency_key_row, magic_link_row, refresh_token_row

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
