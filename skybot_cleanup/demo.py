"""`skybot-cleanup demo`: the app's tables in a SQLite file, seeded, then cleaned."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from skybot_cleanup.schema import app_metadata

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def idempotency_key_row(id_: str, expires: datetime, status: int | None = 200) -> dict:
    return {"id": id_, "key": f"key-{id_}", "accountId": "acc_1", "endpoint": "/api/messages",
            "method": "POST", "requestBody": {"text": "hello"}, "statusCode": status,
            "responseBody": {"ok": True} if status else None,
            "createdAt": expires - DAY, "expiresAt": expires}


def refresh_token_row(id_: str, expires: datetime, revoked: datetime | None = None) -> dict:
    return {"id": id_, "token": f"tok-{id_}", "userAccountId": "ua_1", "accountId": "acc_1",
            "ipAddress": "203.0.113.7", "userAgent": "Mozilla/5.0", "deviceInfo": {"os": "iOS"},
            "expiresAt": expires, "revokedAt": revoked,
            "revokedReason": "logout" if revoked else None, "lastUsedAt": None,
            "createdAt": expires - 30 * DAY, "updatedAt": revoked or expires - 30 * DAY}


def magic_link_row(id_: str, expires: datetime, used: bool = False) -> dict:
    return {"id": id_, "email": "ops@example.com", "token": f"ml-{id_}", "used": used,
            "expiresAt": expires, "createdAt": expires - 15 * MINUTE}


def seed_rows(now: datetime) -> dict[str, list[dict]]:
    """A small, realistic mix; each id says what the row is and which task removes it."""
    key, token, link = idempotency_key_row, refresh_token_row, magic_link_row
    return {
        "IdempotencyKey": [
            key("ik_live", now + 20 * HOUR),
            key("ik_live_in_progress", now + HOUR, status=None),
            key("ik_expired_1h", now - HOUR),
            key("ik_expired_3d", now - 3 * DAY),
        ],
        "RefreshToken": [
            token("rt_live", now + 6 * DAY),
            token("rt_live_2", now + 29 * DAY),
            token("rt_expired_1h", now - HOUR),
            token("rt_expired_10d", now - 10 * DAY),
            token("rt_revoked_2d_ago_kept_for_audit", now - DAY, revoked=now - 2 * DAY),
            token("rt_revoked_89d_ago_kept_for_audit", now - 80 * DAY, revoked=now - 89 * DAY),
            token("rt_revoked_91d_ago", now - 85 * DAY, revoked=now - 91 * DAY),
            token("rt_revoked_200d_ago", now - 190 * DAY, revoked=now - 200 * DAY),
        ],
        "MagicLink": [
            link("ml_live", now + 10 * MINUTE),
            link("ml_used", now + 5 * MINUTE, used=True),
            link("ml_expired", now - HOUR),
            link("ml_expired_and_used", now - DAY, used=True),
        ],
    }


def create_demo_database(path: Path, now: datetime) -> str:
    """(Re)create the demo file and return its URL."""
    path = path.resolve()
    path.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    engine = sa.create_engine(url)
    metadata = app_metadata()
    metadata.create_all(engine)
    with engine.begin() as conn:
        for table_name, rows in seed_rows(now).items():
            conn.execute(metadata.tables[table_name].insert(), rows)
    engine.dispose()
    return url


def ids_by_table(url: str) -> dict[str, set[str]]:
    engine = sa.create_engine(url)
    metadata = app_metadata()
    with engine.connect() as conn:
        found = {name: set(conn.scalars(sa.select(table.c.id))) for name, table in metadata.tables.items()}
    engine.dispose()
    return found
