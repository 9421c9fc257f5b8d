"""`skybot-cleanup demo`: the app's tables, seeded, then cleaned, in a SQLite file or
an empty PostgreSQL database (or schema)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from skybot_cleanup import db
from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.errors import ConfigError
from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.results import RunResult
from skybot_cleanup.run import run_task
from skybot_cleanup.settings import Settings

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
ACCOUNT, USER_ACCOUNT = "acc_1", "ua_1"


def idempotency_key_row(id_: str, expires: datetime, status: int | None = 200) -> dict[str, Any]:
    return {
        "id": id_,
        "key": f"key-{id_}",
        "accountId": ACCOUNT,
        "endpoint": "/api/messages",
        "method": "POST",
        "requestBody": {"text": "hello"},
        "statusCode": status,
        "responseBody": {"ok": True} if status else None,
        "createdAt": expires - DAY,
        "expiresAt": expires,
    }


def refresh_token_row(id_: str, expires: datetime, revoked: datetime | None = None) -> dict[str, Any]:
    return {
        "id": id_,
        "token": f"tok-{id_}",
        "userAccountId": USER_ACCOUNT,
        "accountId": ACCOUNT,
        "ipAddress": "203.0.113.7",
        "userAgent": "Mozilla/5.0",
        "deviceInfo": {"os": "iOS"},
        "expiresAt": expires,
        "revokedAt": revoked,
        "revokedReason": "logout" if revoked else None,
        "lastUsedAt": expires - 29 * DAY,
        "createdAt": expires - 30 * DAY,
        "updatedAt": revoked or expires - 30 * DAY,
    }


def magic_link_row(id_: str, expires: datetime, used: bool = False) -> dict[str, Any]:
    return {
        "id": id_,
        "email": "ops@example.com",
        "token": f"ml-{id_}",
        "used": used,
        "expiresAt": expires,
        "createdAt": expires - 15 * MINUTE,
    }


PARENT_ROWS = {"Account": [{"id": ACCOUNT}], "UserAccount": [{"id": USER_ACCOUNT, "accountId": ACCOUNT}]}


def seed_rows(now: datetime) -> dict[str, list[dict[str, Any]]]:
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


def insert_rows(
    conn: sa.Connection, metadata: sa.MetaData, rows: dict[str, list[dict[str, Any]]], schema: str | None = None
) -> None:
    """Insert rows (by table name), with the parent rows their foreign keys need."""
    prefix = f"{schema}." if schema else ""
    for parent, parent_rows in PARENT_ROWS.items():
        table = metadata.tables[prefix + parent]
        existing = set(conn.scalars(sa.select(table.c.id)))
        missing = [row for row in parent_rows if row["id"] not in existing]
        if missing:
            conn.execute(table.insert(), missing)
    for name, table_rows in rows.items():
        if table_rows:
            conn.execute(metadata.tables[prefix + name].insert(), table_rows)


@dataclass
class DemoDatabase:
    url: str
    schema: str | None
    metadata: sa.MetaData


def create(url: str, now: datetime, settings: Settings) -> DemoDatabase:
    """Create and seed the app's tables: a SQLite file is (re)created; a PostgreSQL
    database or schema must hold no tables at all, to protect real data."""
    target = db.parse_database_url(url, settings.schema_name)
    metadata = app_metadata(settings, schema=target.schema)
    if target.is_postgres:
        engine = db.create_engine(target, settings.session(), "demo")
        try:
            with db.run_transaction(engine, settings.session(), "demo") as run:
                found = _user_tables(run.conn, target.schema)
                if found:
                    raise ConfigError(
                        f"refusing to seed demo rows into a database that already has tables "
                        f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): give an "
                        "empty database, or an empty ?schema="
                    )
                if target.schema and not db.schema_exists(run.conn, target.schema):
                    run.conn.execute(sa.schema.CreateSchema(target.schema))
                metadata.create_all(run.conn)
                insert_rows(run.conn, metadata, seed_rows(now), target.schema)
        finally:
            engine.dispose()
        return DemoDatabase(url, target.schema, metadata)
    path = Path(sa.make_url(url).database or "skybot-demo.db").resolve()
    foreign = _foreign_sqlite_tables(path, metadata)
    if foreign:
        raise ConfigError(
            f"refusing to replace {path}: it holds tables the demo did not make ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); give a new file"
        )
    path.unlink(missing_ok=True)
    sqlite_url = f"sqlite:///{path}"
    engine = sa.create_engine(sqlite_url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            insert_rows(conn, metadata, seed_rows(now))
    finally:
        engine.dispose()
    return DemoDatabase(sqlite_url, None, metadata)


def _foreign_sqlite_tables(path: Path, metadata: sa.MetaData) -> list[str]:
    """Tables in an existing SQLite file that are neither the demo's nor the history's:
    a demo run over the same file replaces it, anything else is someone's data."""
    if not path.exists():
        return []
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    except sqlite3.DatabaseError:
        return [f"{path.name} is not a SQLite database"]
    ours = set(metadata.tables)
    return sorted(name for name in names if name not in ours and not name.startswith(("skybot_cleanup_", "sqlite_")))


def _user_tables(conn: sa.Connection, schema: str | None) -> list[str]:
    query = (
        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
        "WHERE table_schema = :schema ORDER BY 1"
    )
    return list(conn.scalars(sa.text(query), {"schema": schema}))


def ids_by_table(demo: DemoDatabase, settings: Settings) -> dict[str, set[str]]:
    target = db.parse_database_url(demo.url, demo.schema)
    engine = db.create_engine(target, settings.session(), "demo")
    try:
        with db.run_transaction(engine, settings.session(), "demo", read_only=True) as run:
            prefix = f"{demo.schema}." if demo.schema else ""
            tables = [demo.metadata.tables[prefix + settings.table_name(spec)] for spec in REGISTRY.tables]
            return {table.name: set(run.conn.scalars(sa.select(table.c.id))) for table in tables}
    finally:
        engine.dispose()


@dataclass
class DemoStep:
    result: RunResult
    rule: str
    removed: list[str]


def run(demo: DemoDatabase, settings: Settings, now: datetime) -> Iterable[DemoStep]:
    """Every task in turn, with the ids each one removed."""
    for task in REGISTRY.tasks:
        before = ids_by_table(demo, settings)
        result = run_task(settings, task, now=now)
        after = ids_by_table(demo, settings)
        removed = sorted(set().union(*(before[name] - after[name] for name in before)))
        yield DemoStep(result, task.rule, removed)


def invocation(argv0: str | None = None) -> str:
    """How to run the tool again from where the demo ran: as it was run. The README's
    first command runs `.venv/bin/skybot-cleanup`, which is not on a newcomer's PATH, so
    a bare `skybot-cleanup` is suggested only when it is this very program."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if Path(argv0).name != "skybot-cleanup":  # python -m skybot_cleanup
        return f"{shlex.quote(sys.executable)} -m skybot_cleanup"
    on_path = shutil.which("skybot-cleanup")
    with contextlib.suppress(OSError):
        if on_path and os.path.samefile(on_path, argv0):
            return "skybot-cleanup"
    return shlex.quote(argv0)
