"""The app's tables, and rows in them laid out one of several ways: one seeding function, a
`Layout` saying where the due rows lie in the heap.

The tables come from the tool's own schema module (`skybot_cleanup.app_schema`, which
matches the app's Prisma migrations). The rows are seeded server-side in one statement:
cuid-like ids, sha256-hex tokens, real-looking user agents and device info.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa

from benchmarks.databases import DUE, REVOKED_DUE, create, drop, unique_name

N = "%(now)s::timestamp"
# 12 h (default) and 3 d (remember me), as the app issues them, and the 30 d of the other layouts.
LIFE = "(ARRAY[interval '12 hours', interval '3 days', interval '30 days'])[mod(g, 3) + 1]"


def spread(count: str, seconds: int) -> str:
    """Row g of %(count)s, evenly over `seconds`: a creation time in creation order."""
    return f"(g::bigint * {seconds} / %({count})s) * interval '1 second'"


# Every layout's rows come as (g, kind, created, expires, revoked); the columns around
# them are the same for all. Due rows end at least a minute before the seed's now and
# live rows start hours after it, so the tool's own later "now" selects exactly the
# seeded due rows.
SEED = """
INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "expiresAt", "revokedAt", "revokedReason",
                            "deviceInfo", "ipAddress", "userAgent", "lastUsedAt", "createdAt", "updatedAt")
SELECT 'c' || substr(md5(g::text || kind), 1, 24), encode(sha256((g::text || kind)::bytea), 'hex'),
       'ua_' || (mod(g, 2000) + 1), 'acc_' || (mod(g, 200) + 1), expires, revoked,
       CASE WHEN revoked IS NOT NULL THEN 'logout' END,
       jsonb_build_object('os', 'iOS', 'osVersion', '17.1', 'device', 'iPhone15,2', 'app', '2.4.' || mod(g, 9)),
       '203.0.' || mod(g, 250) || '.' || mod(g, 200),
       'Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Version/17.1 Mobile/15E148',
       {stamps}
FROM ({rows}) r (g, kind, created, expires, revoked)
ORDER BY {order}
"""
# "lastUsedAt", "createdAt", "updatedAt" from the row's creation time.
CREATED_STAMPS = "LEAST(created + interval '1 hour', %(now)s), created, created"


@dataclass(frozen=True)
class Layout:
    name: str
    task: str  # the tool's command
    due_sql: str  # the task's predicate: the floor's WHERE and the exactness check's
    retention: timedelta  # cutoff = the seed's now - retention
    rows: str  # SELECT g, kind, created, expires, revoked: due, live and revoked rows
    order: str  # the insert's ORDER BY: the heap order
    analyze: bool = True
    stamps: str = CREATED_STAMPS  # "lastUsedAt", "createdAt", "updatedAt"


# Due rows over the last 30 days whatever their number, live ones over the next 30 days,
# revoked ones expired over the last 10 and revoked over the last 60, written in expiry
# order: the data of `scaling`, `variants`, `aftermath`, `remote` and `replica`.
_EXPIRY_ROWS = f"""
        SELECT g, kind, NULL::timestamp, expires, revoked
        FROM (SELECT g, 'due' AS kind,
                     {N} - {spread("due", 30 * 86400)} - interval '1 minute' AS expires, NULL::timestamp AS revoked
              FROM generate_series(1, %(due)s) g
              UNION ALL SELECT g, 'live', {N} + mod(g, 2592000) * interval '1 second' + interval '2 days', NULL
              FROM generate_series(1, %(live)s) g
              UNION ALL SELECT g, 'revoked', {N} - mod(g, 864000) * interval '1 second',
                               {N} - mod(g, 5184000) * interval '1 second'
              FROM generate_series(1, %(revoked)s) g) r"""
_FIXED_STAMPS = f"{N} - interval '1 day', {N} - interval '30 days', {N} - interval '1 day'"
EXPIRY_ORDER = Layout("expiry", "refresh-tokens", DUE, timedelta(0), _EXPIRY_ROWS, "expires", stamps=_FIXED_STAMPS)
# The same rows shuffled, as a heap whose freed space has been refilled for months ends up
# (each due row on a page of its own, the worst case): `aftermath --shuffled`.
SHUFFLED = Layout("shuffled", "refresh-tokens", DUE, timedelta(0), _EXPIRY_ROWS, "random()", stamps=_FIXED_STAMPS)

# The four layouts of the `layouts` mode (issue 16).
LAYOUTS: dict[str, Layout] = {
    # One 30-day lifetime, written in creation order: expiry order is heap order.
    "clustered": Layout(
        "clustered",
        "refresh-tokens",
        DUE,
        timedelta(0),
        f"""
        SELECT g, kind, created, created + interval '30 days' AS expires,
               CASE kind WHEN 'revoked' THEN LEAST(created + interval '1 hour', {N} - interval '1 minute') END
        FROM (SELECT g, 'due' AS kind, {N} - interval '60 days 1 minute' + {spread("due", 30 * 86400)} AS created
              FROM generate_series(1, %(due)s) g
              UNION ALL SELECT g, 'live', {N} - interval '28 days' + {spread("live", 28 * 86400)}
              FROM generate_series(1, %(live)s) g
              UNION ALL SELECT g, 'revoked', {N} - interval '60 days' + {spread("revoked", 60 * 86400)}
              FROM generate_series(1, %(revoked)s) g) r""",
        "created",
    ),
    # 12 h, 3 d and 30 d interleaved as the app writes them: created uniformly, in creation
    # order, so a page holds rows expiring weeks apart.
    "mixed": Layout(
        "mixed",
        "refresh-tokens",
        DUE,
        timedelta(0),
        f"""
        SELECT g, kind, expires - life AS created, expires,
               CASE kind WHEN 'revoked' THEN LEAST(expires - life + interval '1 minute', {N} - interval '1 minute') END
        FROM (SELECT g, 'due' AS kind, {LIFE} AS life,
                     {N} - interval '1 minute' - random() * interval '30 days' AS expires
              FROM generate_series(1, %(due)s) g
              UNION ALL SELECT g, 'live', {LIFE}, {N} + interval '2 hours' + random() * ({LIFE} - interval '2 hours')
              FROM generate_series(1, %(live)s) g
              UNION ALL SELECT g, 'revoked', {LIFE}, {N} - random() * interval '40 days' + {LIFE}
              FROM generate_series(1, %(revoked)s) g) r""",
        "created",
    ),
    # Expiry independent of heap position, and tied: 1,000 distinct values among the due rows.
    "scattered": Layout(
        "scattered",
        "refresh-tokens",
        DUE,
        timedelta(0),
        f"""
        SELECT g, kind, created, expires, CASE kind WHEN 'revoked' THEN created + interval '1 hour' END
        FROM (SELECT g, 'due' AS kind, {N} - interval '40 days' AS created,
                     {N} - (1 + mod(g::bigint * 7919, 1000)) * interval '1 minute' AS expires
              FROM generate_series(1, %(due)s) g
              UNION ALL SELECT g, 'live', {N} - interval '1 day',
                     {N} + interval '2 days' + (1 + mod(g::bigint * 7919, 1000)) * interval '1 minute'
              FROM generate_series(1, %(live)s) g
              UNION ALL SELECT g, 'revoked', {N} - interval '40 days',
                     {N} - (1 + mod(g::bigint * 7919, 1000)) * interval '1 minute'
              FROM generate_series(1, %(revoked)s) g) r""",
        "random()",
    ),
    # revoked-tokens after one mass revocation: every due row has the same "revokedAt",
    # on a table never analyzed (autovacuum off, plain VACUUM): the planner knows nothing.
    "masstie": Layout(
        "masstie",
        "revoked-tokens",
        REVOKED_DUE,
        timedelta(days=90),
        f"""
        SELECT g, kind, created, created + interval '30 days' AS expires,
               CASE kind WHEN 'due' THEN {N} - interval '100 days' WHEN 'revoked' THEN created + interval '1 hour' END
        FROM (SELECT g, 'due' AS kind, {N} - interval '130 days' + {spread("due", 2591000)} AS created
              FROM generate_series(1, %(due)s) g
              UNION ALL SELECT g, 'live', {N} - interval '28 days' + {spread("live", 28 * 86400)}
              FROM generate_series(1, %(live)s) g
              UNION ALL SELECT g, 'revoked', {N} - interval '80 days' + {spread("revoked", 6000000)}
              FROM generate_series(1, %(revoked)s) g) r""",
        "created",
        analyze=False,
    ),
}

# Expired idempotency keys over the week before the seed's now: the coexist mode's
# background table, which no method deletes from.
IDEMPOTENCY_BACKLOG = """
INSERT INTO "IdempotencyKey" (id, key, "accountId", endpoint, method, "requestBody", "statusCode", "responseBody",
                              "createdAt", "expiresAt")
SELECT 'c' || substr(md5(g::text || 'key'), 1, 24), 'seed_' || g, 'acc_' || (mod(g, 200) + 1), '/api/messages', 'POST',
       jsonb_build_object('conversationId', 'conv_' || mod(g, 5000), 'text', repeat('x', 80)), 201,
       jsonb_build_object('id', 'msg_' || g, 'status', 'sent'), created, created + interval '24 hours'
FROM (SELECT g, %(now)s - interval '1 day 1 minute' - (g::bigint * 604800 / %(keys)s) * interval '1 second' AS created
      FROM generate_series(1, %(keys)s) g) k
ORDER BY created
"""


def create_app_tables(url: str) -> None:
    """The app's tables (and the parents the tokens reference), from the tool's schema module."""
    from skybot_cleanup.app_schema import app_metadata

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), poolclass=sa.pool.NullPool)
    try:
        app_metadata().create_all(engine)
    finally:
        engine.dispose()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO "Account" SELECT 'acc_' || g FROM generate_series(1, 200) g""")
        conn.execute("""INSERT INTO "UserAccount" SELECT 'ua_' || g, 'acc_' || (mod(g, 200) + 1)
                        FROM generate_series(1, 2000) g""")


def seed_rows(conn: psycopg.Connection[Any], layout: Layout, due: int, live: int, revoked: int, now: datetime) -> None:
    """The tokens alone, laid out as `layout` says, in one statement."""
    conn.execute("SELECT setseed(0.42)")  # the same random() layout on every build
    params = {"now": now, "due": due, "live": live, "revoked": revoked}
    conn.execute(SEED.format(rows=layout.rows, order=layout.order, stamps=layout.stamps), params)


def seed(
    url: str, layout: Layout, due: int, live: int, revoked: int, now: datetime, *, idempotency_keys: int = 0
) -> None:
    """The app's tables in an empty database, `due` due rows among `live` live and
    `revoked` revoked ones laid out as `layout` says, and `idempotency_keys` expired keys;
    then VACUUM (ANALYZE unless the layout is never analyzed)."""
    create_app_tables(url)
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        if not layout.analyze:
            # Set before the insert: autovacuum would otherwise analyze the table within a minute.
            conn.execute('ALTER TABLE "RefreshToken" SET (autovacuum_enabled = off)')
        seed_rows(conn, layout, due, live, revoked, now)
        if idempotency_keys:
            conn.execute(IDEMPOTENCY_BACKLOG, {"now": now, "keys": idempotency_keys})
        # Plain VACUUM still sets the visibility map and pg_class's row estimate, as the
        # first autovacuum would; only ANALYZE's statistics stay missing.
        conn.execute("VACUUM ANALYZE" if layout.analyze else "VACUUM")
    print(
        f"  {layout.name}: seeded {due + live + revoked:,} rows in {time.monotonic() - started:.0f} s", file=sys.stderr
    )


def build_template(
    admin_url: str, layout: Layout, due: int, live: int, revoked: int, now: datetime, *, idempotency_keys: int = 0
) -> str:
    """A template database seeded as `seed` says, to copy for each measured run; its name."""
    name = unique_name(f"skybot_bench_tpl_{layout.name}_{due}")
    url = create(admin_url, name)
    try:
        seed(url, layout, due, live, revoked, now, idempotency_keys=idempotency_keys)
    except BaseException:
        drop(admin_url, name)
        raise
    return name
