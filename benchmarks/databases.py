"""Databases for the benchmarks: connections, URLs, fresh copies of a template, WAL positions
and the counts every exactness check reads."""

from __future__ import annotations

import os
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

# The refresh-tokens task's due rows, in the benchmarks' own SQL: the floor's WHERE and
# the checks'.
DUE = """"expiresAt" < %(cutoff)s AND "revokedAt" IS NULL"""
REVOKED_DUE = """"revokedAt" < %(cutoff)s"""
SMALL_TEMPLATE_BYTES = 64 * 1024 * 1024


def admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def database_url(server_url: str, name: str) -> str:
    """The same server, another database (a unix-socket URL keeps its ?host=)."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def unique_name(prefix: str) -> str:
    # Unique, so that two runs at once (the smoke tests in parallel, say) never drop
    # each other's databases.
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def create(admin_url: str, name: str) -> str:
    """An empty database; its URL."""
    with admin(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return database_url(admin_url, name)


def fresh_copy(admin_url: str, template: str, *, settle: bool = False) -> str:
    """A copy of `template` with nothing of it left in shared buffers or unwritten; its name."""
    name = unique_name("skybot_bench")
    with admin(admin_url) as conn:
        row = conn.execute("SELECT pg_database_size(%s)", (template,)).fetchone()
        assert row is not None
        # FILE_COPY takes two checkpoints of the whole server, WAL_LOG writes the copy to the
        # WAL (and, on a primary, through the link to its standbys): the one for a big
        # template, the other for a small one, as PostgreSQL's docs advise. Either way the
        # measured run starts after the CHECKPOINT below.
        strategy = "FILE_COPY" if int(row[0]) > SMALL_TEMPLATE_BYTES else "WAL_LOG"
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY {strategy}')
        conn.execute("CHECKPOINT")
        if settle:
            # The copy's dirty pages in the OS cache would otherwise be written back while
            # the next run is measured: on a small VM that alone moves times by tens of %.
            os.sync()
            conn.execute("CHECKPOINT")
    return name


def drop(admin_url: str, name: str) -> None:
    with admin(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wal_position(conn: psycopg.Connection[Any]) -> str:
    # The insert position: with synchronous_commit off the flushed position lags behind.
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def wal_since(conn: psycopg.Connection[Any], start: str) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)", (start,)).fetchone()
    assert row is not None
    return int(row[0])


def scalar(url: str, sql: str, params: dict[str, Any] | None = None) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def left_due(url: str, cutoff: datetime, due_sql: str = DUE) -> int:
    """Seeded due rows still there ('w' ids are the app writer's own rows)."""
    return scalar(
        url, f"""SELECT count(*) FROM "RefreshToken" WHERE {due_sql} AND id NOT LIKE 'w%%'""", {"cutoff": cutoff}
    )


def total_rows(url: str) -> int:
    """Seeded rows still there, due or not."""
    return scalar(url, """SELECT count(*) FROM "RefreshToken" WHERE id NOT LIKE 'w%%'""")
