#!/usr/bin/env python3
"""skybot-cleanup against its floors, side by side, on identical fresh copies.

    python benchmarks/bench.py startup                  # the hourly no-op run vs the stack's import
    python benchmarks/bench.py variants --size 1000000  # batch statement shapes, as raw SQL
    python benchmarks/bench.py scaling --sizes 10000 100000 1000000 5000000 10000000
    python benchmarks/bench.py aftermath --size 1000000 # what the delete leaves for VACUUM (--shuffled: rows
                                                        # in random order, one due row per page at worst)
    python benchmarks/bench.py layouts --size 1000000   # four heap layouts of the due rows (clustered, mixed
                                                        # lifetimes, scattered ties, one never-analyzed mass tie)
    python benchmarks/bench.py coexist --size 1000000 --seconds 20
                                                        # the app's own statements beside each method, at two rates
    python benchmarks/bench.py chart                    # docs/img/scaling.png from the saved results
    python benchmarks/bench.py layouts-chart            # docs/img/layouts.png from results/layouts.json

    --results-dir DIR (before the mode) writes and reads the JSON there instead of benchmarks/results
    (smoke runs at a small size, which must not overwrite the real results).

Every measurement is repeated (--reps, default 3) and reported as the median with its
spread (min-max). Data: the app's own "RefreshToken" (and its parent tables, indexes and
foreign keys) from skybot_cleanup.app_schema, seeded into a template database per size, in
expiry order as the app writes it, with live and revoked rows beside the due ones. Every
method runs on its own copy (CREATE DATABASE ... TEMPLATE, then CHECKPOINT), with an app
writer inserting and refreshing tokens ~100 times a second, and the script asserts that
each one deleted exactly the due rows and nothing else. Results go to
benchmarks/results/<mode>.json and print as Markdown.

`coexist` replaces that writer with the app's real statements, in the shape Prisma sends
them (autocommit, no transactions), from paced threads, and records per statement kind
the latency, the errors by SQLSTATE and the statements that waited for a lock.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.types.json import Jsonb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOOL = Path(sys.executable).with_name("skybot-cleanup")
CHART = HERE.parent / "docs" / "img" / "scaling.png"
LAYOUTS_CHART = HERE.parent / "docs" / "img" / "layouts.png"

# cuid-like ids, sha256-hex tokens, real-looking user agents and device info; rows in
# expiry order (tokens are written as they are issued).
SEED = """
INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "expiresAt", "revokedAt", "revokedReason",
                            "deviceInfo", "ipAddress", "userAgent", "lastUsedAt", "createdAt", "updatedAt")
SELECT 'c' || substr(md5(g::text || kind), 1, 24), encode(sha256((g::text || kind)::bytea), 'hex'),
       'ua_' || (mod(g, 2000) + 1), 'acc_' || (mod(g, 200) + 1),
       CASE kind WHEN 'due'
                 THEN %(now)s - (g::bigint * %(due_span)s / %(due)s) * interval '1 second' - interval '1 minute'
                 WHEN 'live' THEN %(now)s + mod(g, 2592000) * interval '1 second' + interval '2 days'
                 ELSE %(now)s - mod(g, 864000) * interval '1 second' END,
       CASE kind WHEN 'revoked' THEN %(now)s - mod(g, 5184000) * interval '1 second' END,
       CASE kind WHEN 'revoked' THEN 'logout' END,
       jsonb_build_object('os', 'iOS', 'osVersion', '17.1', 'device', 'iPhone15,2', 'app', '2.4.' || mod(g, 9)),
       '203.0.' || mod(g, 250) || '.' || mod(g, 200),
       'Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Version/17.1 Mobile/15E148',
       %(now)s - interval '1 day', %(now)s - interval '30 days', %(now)s - interval '1 day'
FROM (SELECT g, 'due' AS kind FROM generate_series(1, %(due)s) g
      UNION ALL SELECT g, 'live' FROM generate_series(1, %(live)s) g
      UNION ALL SELECT g, 'revoked' FROM generate_series(1, %(revoked)s) g) rows
ORDER BY {order}
"""
DUE = """"expiresAt" < %(cutoff)s AND "revokedAt" IS NULL"""
FLOOR_SQL = f"""DELETE FROM "RefreshToken" WHERE {DUE}"""


def admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def database_url(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + name


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], digits: int = 2) -> str:
    median, low, high = median_spread(values)
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# -- data -------------------------------------------------------------------------------------


def build_template(admin_url: str, due: int, live: int, revoked: int, now: datetime, *, shuffled: bool = False) -> str:
    """The app's tables from the tool's own schema module, then the rows: in expiry
    order as the app writes them, or shuffled, as a heap whose freed space has been
    refilled for months ends up (each due row on a page of its own, the worst case)."""
    from skybot_cleanup.app_schema import app_metadata

    name = f"skybot_bench_tpl_{due}{'_shuffled' if shuffled else ''}"
    with admin(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(admin_url, name)
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"), poolclass=sa.pool.NullPool)
    app_metadata().create_all(engine)
    engine.dispose()
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO "Account" SELECT 'acc_' || g FROM generate_series(1, 200) g""")
        conn.execute("""INSERT INTO "UserAccount" SELECT 'ua_' || g, 'acc_' || (mod(g, 200) + 1)
                        FROM generate_series(1, 2000) g""")
        # Due rows spread over the last 30 days, whatever their number.
        seed = SEED.format(order="random()" if shuffled else "5")
        conn.execute(seed, {"now": now, "due": due, "live": live, "revoked": revoked, "due_span": 30 * 86400})
        conn.execute("VACUUM ANALYZE")
    print(f"  seeded {due + live + revoked:,} rows in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return name


def fresh_copy(admin_url: str, template: str, *, settle: bool = False) -> str:
    name = f"skybot_bench_{uuid.uuid4().hex[:8]}"
    with admin(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
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


# -- layouts: where the due rows lie in the heap ----------------------------------------------

N = "%(now)s::timestamp"
# 12 h (default) and 3 d (remember me), as the app issues them, and the 30 d of the other layouts.
LIFE = "(ARRAY[interval '12 hours', interval '3 days', interval '30 days'])[mod(g, 3) + 1]"


def spread(count: str, seconds: int) -> str:
    """Row g of %(count)s, evenly over `seconds`: a creation time in creation order."""
    return f"(g::bigint * {seconds} / %({count})s) * interval '1 second'"


# Every layout's rows come as (g, kind, created, expires, revoked); the columns around
# them are SEED's. Due rows end at least a minute before the seed's now and live rows
# start hours after it, so the tool's own later "now" selects exactly the seeded due rows.
LAYOUT_SEED = """
INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "expiresAt", "revokedAt", "revokedReason",
                            "deviceInfo", "ipAddress", "userAgent", "lastUsedAt", "createdAt", "updatedAt")
SELECT 'c' || substr(md5(g::text || kind), 1, 24), encode(sha256((g::text || kind)::bytea), 'hex'),
       'ua_' || (mod(g, 2000) + 1), 'acc_' || (mod(g, 200) + 1), expires, revoked,
       CASE WHEN revoked IS NOT NULL THEN 'logout' END,
       jsonb_build_object('os', 'iOS', 'osVersion', '17.1', 'device', 'iPhone15,2', 'app', '2.4.' || mod(g, 9)),
       '203.0.' || mod(g, 250) || '.' || mod(g, 200),
       'Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Version/17.1 Mobile/15E148',
       LEAST(created + interval '1 hour', %(now)s), created, created
FROM ({rows}) r (g, kind, created, expires, revoked)
ORDER BY {order}
"""
REVOKED_DUE = """"revokedAt" < %(cutoff)s"""


@dataclass(frozen=True)
class Layout:
    name: str
    task: str  # the tool's command
    due_sql: str  # the task's predicate: the floor's WHERE and the exactness check's
    retention: timedelta  # cutoff = the seed's now - retention
    rows: str  # SELECT g, kind, created, expires, revoked: due, live and revoked rows
    order: str  # the insert's ORDER BY: the heap order
    analyze: bool = True


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


def build_layout(
    admin_url: str, layout: Layout, due: int, live: int, revoked: int, now: datetime, *, idempotency_keys: int = 0
) -> str:
    """A template of one layout, seeded server-side in one statement; idempotency_keys
    expired keys beside it (the coexist mode's background table)."""
    from skybot_cleanup.app_schema import app_metadata

    name = f"skybot_bench_tpl_{layout.name}_{due}{'_keys' if idempotency_keys else ''}"
    with admin(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(admin_url, name)
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"), poolclass=sa.pool.NullPool)
    app_metadata().create_all(engine)
    engine.dispose()
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO "Account" SELECT 'acc_' || g FROM generate_series(1, 200) g""")
        conn.execute("""INSERT INTO "UserAccount" SELECT 'ua_' || g, 'acc_' || (mod(g, 200) + 1)
                        FROM generate_series(1, 2000) g""")
        if not layout.analyze:
            # Set before the insert: autovacuum would otherwise analyze the table within a minute.
            conn.execute('ALTER TABLE "RefreshToken" SET (autovacuum_enabled = off)')
        conn.execute("SELECT setseed(0.42)")  # the same random() layout on every build
        params = {"now": now, "due": due, "live": live, "revoked": revoked}
        conn.execute(LAYOUT_SEED.format(rows=layout.rows, order=layout.order), params)
        if idempotency_keys:
            conn.execute(IDEMPOTENCY_BACKLOG, {"now": now, "keys": idempotency_keys})
        # Plain VACUUM still sets the visibility map and pg_class's row estimate, as the
        # first autovacuum would; only ANALYZE's statistics stay missing.
        conn.execute("VACUUM ANALYZE" if layout.analyze else "VACUUM")
    print(
        f"  {layout.name}: seeded {due + live + revoked:,} rows in {time.monotonic() - started:.0f} s", file=sys.stderr
    )
    return name


def left_due(url: str, cutoff: datetime, due_sql: str = DUE) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"""SELECT count(*) FROM "RefreshToken" WHERE {due_sql} AND id NOT LIKE 'w%%'""", {"cutoff": cutoff}
        ).fetchone()
    return int(row[0]) if row else -1


def total_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("""SELECT count(*) FROM "RefreshToken" WHERE id NOT LIKE 'w%%'""").fetchone()
    return int(row[0]) if row else -1


class Writer(threading.Thread):
    """The app: inserts a live token and refreshes another, ~100 times a second."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.latencies_ms = url, threading.Event(), []

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            i = 0
            while not self.stop.is_set():
                i += 1
                statements = (
                    (
                        """INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "expiresAt",
                                                   "updatedAt")
                        VALUES (%s, %s, 'ua_1', 'acc_2', now() AT TIME ZONE 'UTC' + interval '7 days',
                                now() AT TIME ZONE 'UTC')""",
                        (f"w{uuid.uuid4().hex[:24]}", uuid.uuid4().hex * 2),
                    ),
                    (
                        """UPDATE "RefreshToken" SET "lastUsedAt" = now() AT TIME ZONE 'UTC'
                        WHERE id = (SELECT id FROM "RefreshToken" WHERE "expiresAt" > now() AT TIME ZONE 'UTC'
                                    ORDER BY "expiresAt" DESC LIMIT 1 OFFSET %s)""",
                        (i % 500,),
                    ),
                )
                for sql, params in statements:
                    started = time.perf_counter()
                    conn.execute(sql, params)
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                time.sleep(0.01)


WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "wall = time.perf_counter() - t\n"
    "print(json.dumps({'wall_s': wall, 'rc': p.returncode, 'stdout': p.stdout, 'stderr': p.stderr,\n"
    "                  'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def measured(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """A command in a wrapper process that reports its wall time and peak RSS alone."""
    completed = subprocess.run([sys.executable, "-c", WRAPPER, *command], env=env, capture_output=True, text=True)
    return dict(json.loads(completed.stdout))


def wal_position(conn: psycopg.Connection[Any]) -> str:
    # The insert position: with synchronous_commit off the flushed position lags behind.
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def wal_since(conn: psycopg.Connection[Any], start: str) -> int:
    row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)", (start,)).fetchone()
    assert row is not None
    return int(row[0])


def on_fresh_copy(
    admin_url: str,
    template: str,
    work: Callable[[str], dict[str, Any]],
    *,
    due_sql: str = DUE,
    settle: bool = False,
) -> dict[str, Any]:
    """work(url) on a fresh copy, with the app writer running, measuring WAL and latency."""
    name = fresh_copy(admin_url, template, settle=settle)
    url = database_url(admin_url, name)
    writer = Writer(url)
    try:
        writer.start()
        time.sleep(0.5)  # a steady writer before the run starts
        writer.latencies_ms.clear()
        with admin(admin_url) as conn:
            start = wal_position(conn)
            result = work(url)
            result["wal_bytes"] = wal_since(conn, start)
        writer.stop.set()
        writer.join()
        result |= {
            "writer_p50_ms": percentile(writer.latencies_ms, 50),
            "writer_p99_ms": percentile(writer.latencies_ms, 99),
            "writer_ops": len(writer.latencies_ms),
            "left": left_due(url, result["cutoff"], due_sql),
            "total": total_rows(url),
        }
    finally:
        writer.stop.set()
        drop(admin_url, name)
    return result


# -- the methods ------------------------------------------------------------------------------


def first_run(url: str) -> None:
    """The tool's first run on a template (magic-links: nothing due), so the measured runs
    find its history tables there, as every run after a deployment's first does."""
    env = {**os.environ, "DATABASE_URL": url, "PGHOST": "", "PGDATABASE": ""}
    subprocess.run([str(TOOL), "magic-links", "--json"], env=env, capture_output=True, check=True)


def floor(url: str, cutoff: datetime, due_sql: str = DUE) -> dict[str, Any]:
    """The plain DELETE, timed around the statement (start-up excluded)."""
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        cursor = conn.execute(f"""DELETE FROM "RefreshToken" WHERE {due_sql}""", {"cutoff": cutoff})
        elapsed = time.perf_counter() - started
        return {"method": "floor", "wall_s": elapsed, "statement_s": elapsed, "rows": cursor.rowcount, "cutoff": cutoff}


def tool(
    url: str, cutoff: datetime, batch_size: int | None, *, task: str = "refresh-tokens", strict: bool = True
) -> dict[str, Any]:
    """The console script, as cron runs it (history on). Its cutoff is its own "now",
    which selects the same rows: the seeded due rows end a minute before the seed's now.
    batch_size None: --single-transaction (the tool's default is batched, so it must be
    asked for). strict=False: a failed run is a result (under the app's load), not an exit."""
    env = {**os.environ, "DATABASE_URL": url, "SKYBOT_CLEANUP_LOG_FORMAT": "json", "PGHOST": "", "PGDATABASE": ""}
    mode = ["--batch-size", str(batch_size)] if batch_size else ["--single-transaction"]
    command = [str(TOOL), task, "--json", *mode]
    result = measured(command, env)
    if result["rc"] != 0 and strict:
        raise SystemExit(f"the tool failed: {result['stderr'][-2000:]}")
    try:
        output = json.loads(result["stdout"])
    except json.JSONDecodeError:
        output = {
            "rows": 0,
            "duration_ms": result["wall_s"] * 1000,
            "status": "no JSON",
            "error": result["stderr"][-500:],
        }
    return {
        "method": f"batched {batch_size:,}" if batch_size else "single transaction",
        "wall_s": result["wall_s"],
        "statement_s": output["duration_ms"] / 1000,
        "rows": output["rows"],
        "cutoff": cutoff,
        "maxrss_mb": result["maxrss_kb"] / 1024,
        "longest_batch_ms": output.get("longest_batch_ms"),
        "batches": output.get("batches"),
        # Under load: what the run says it left (rows the app held) and how it ended.
        "remaining": output.get("remaining"),
        "status": output.get("status"),
        "rc": result["rc"],
        "error": output.get("error"),
    }


# -- batch statement variants, as raw SQL -------------------------------------------------------


def batches_skip_locked(conn: psycopg.Connection[Any], cutoff: datetime, size: int, *, lock: bool) -> int:
    """The previous design: ctids picked through the index from the low-water mark,
    locked FOR UPDATE SKIP LOCKED (or not), deleted by ctid, count and max returned."""
    low, done = None, 0
    lock_clause = "FOR UPDATE SKIP LOCKED" if lock else ""
    while True:
        row = conn.execute(
            f"""
            WITH deleted AS (
              DELETE FROM "RefreshToken" WHERE ctid = ANY(ARRAY(
                SELECT ctid FROM "RefreshToken" WHERE {DUE} AND (%(low)s::timestamp IS NULL OR "expiresAt" >= %(low)s)
                ORDER BY "expiresAt" LIMIT %(size)s {lock_clause}))
              AND {DUE} RETURNING "expiresAt")
            SELECT count(*), max("expiresAt") FROM deleted""",
            {"cutoff": cutoff, "low": low, "size": size},
        ).fetchone()
        conn.commit()
        assert row is not None
        done += row[0]
        low = row[1] or low
        if row[0] < size:
            return done


def batches_range(conn: psycopg.Connection[Any], cutoff: datetime, size: int, *, sync: bool) -> int:
    """The tool's design: the batch's end found N rows on by an index-only scan, one range DELETE."""
    if not sync:
        conn.execute("SET synchronous_commit = off")
    low, done = None, 0
    while True:
        row = conn.execute(
            """SELECT "expiresAt" FROM "RefreshToken"
                              WHERE (%(low)s::timestamp IS NULL OR "expiresAt" >= %(low)s) AND "expiresAt" < %(cutoff)s
                              ORDER BY "expiresAt" OFFSET %(size)s LIMIT 1""",
            {"cutoff": cutoff, "low": low, "size": size},
        ).fetchone()
        end = row[0] if row else None
        cursor = conn.execute(
            f"""DELETE FROM "RefreshToken" WHERE {DUE}
                                  AND (%(low)s::timestamp IS NULL OR "expiresAt" >= %(low)s)
                                  AND (%(end)s::timestamp IS NULL OR "expiresAt" < %(end)s)""",
            {"cutoff": cutoff, "low": low, "end": end},
        )
        conn.commit()
        done += cursor.rowcount
        if end is None:
            return done
        low = end


VARIANTS: dict[str, Callable[[psycopg.Connection[Any], datetime, int], int]] = {
    "ctid + FOR UPDATE SKIP LOCKED (previous)": lambda c, t, n: batches_skip_locked(c, t, n, lock=True),
    "ctid, no row lock": lambda c, t, n: batches_skip_locked(c, t, n, lock=False),
    "index range (kept)": lambda c, t, n: batches_range(c, t, n, sync=True),
    "index range, synchronous_commit off": lambda c, t, n: batches_range(c, t, n, sync=False),
}


def variant(url: str, cutoff: datetime, name: str, size: int) -> dict[str, Any]:
    with psycopg.connect(url, prepare_threshold=None) as conn:
        started = time.perf_counter()
        rows = VARIANTS[name](conn, cutoff, size)
        elapsed = time.perf_counter() - started
    return {"method": name, "wall_s": elapsed, "statement_s": elapsed, "rows": rows, "cutoff": cutoff}


# -- metrics and status on a big table ----------------------------------------------------------


def reporting_sql_time(url: str) -> dict[str, float]:
    """The SQL time of a metrics snapshot and of status, in-process (no start-up)."""
    from skybot_cleanup import db, metrics, status
    from skybot_cleanup.clock import utc_now
    from skybot_cleanup.settings import load

    settings = load({"database_url": url, "history": False}).settings
    engine = db.create_engine(db.parse_database_url(url), settings.session(), "bench")
    timings: dict[str, float] = {}
    try:
        for name, collect in (("metrics_ms", metrics.collect), ("status_ms", status.collect)):
            with db.run_transaction(engine, settings.session(), "bench", read_only=True) as run:
                collect(run.conn, settings, "public", utc_now())  # warm: connection and catalog caches
                started = time.perf_counter()
                collect(run.conn, settings, "public", utc_now())
                timings[name] = (time.perf_counter() - started) * 1000
    finally:
        engine.dispose()
    return timings


# -- modes --------------------------------------------------------------------------------------


def check(result: dict[str, Any], due: int, total: int) -> None:
    assert result["left"] == 0, f"{result['method']} left {result['left']} due rows"
    assert result["rows"] == due, f"{result['method']} deleted {result['rows']} rows, expected {due}"
    assert result["total"] == total - due, f"{result['method']} deleted rows that were not due"


def scaling(args: argparse.Namespace) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    cutoff = now
    results: list[dict[str, Any]] = []
    for due in args.sizes:
        template = build_template(args.admin_url, due, args.live, args.revoked, now)
        total = due + args.live + args.revoked
        try:
            reporting = [reporting_sql_time(database_url(args.admin_url, template)) for _ in range(args.reps)]
            methods: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
                ("floor", lambda url: floor(url, cutoff)),
                ("single transaction", lambda url: tool(url, cutoff, None)),
                (f"batched {args.batch_size:,}", lambda url: tool(url, cutoff, args.batch_size)),
            ]
            for _rep in range(args.reps):
                for _label, work in methods:
                    result = on_fresh_copy(args.admin_url, template, work)
                    check(result, due, total)
                    results.append({**result, "due": due, "cutoff": str(result["cutoff"])})
                    print(f"  {due:,} {result['method']}: {result['statement_s']:.2f} s", file=sys.stderr)
            results.append(
                {
                    "method": "reporting",
                    "due": due,
                    "metrics_ms": [r["metrics_ms"] for r in reporting],
                    "status_ms": [r["status_ms"] for r in reporting],
                }
            )
        finally:
            drop(args.admin_url, template)
    save("scaling", results)
    print_scaling(results)


def print_scaling(results: list[dict[str, Any]]) -> None:
    print(
        "| due rows | method | wall s | statement s | rows/s | × floor | WAL MB | × floor WAL | peak RSS MB "
        "| longest batch ms | writer p50 ms | writer p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    sizes = sorted({r["due"] for r in results})
    for due in sizes:
        rows = [r for r in results if r["due"] == due and r["method"] != "reporting"]
        floor_s = statistics.median(r["statement_s"] for r in rows if r["method"] == "floor")
        floor_wal = statistics.median(r["wal_bytes"] for r in rows if r["method"] == "floor")
        for method in dict.fromkeys(r["method"] for r in rows):
            runs = [r for r in rows if r["method"] == method]
            seconds = [r["statement_s"] for r in runs]
            wal = [r["wal_bytes"] / 1e6 for r in runs]
            rss = [r["maxrss_mb"] for r in runs if r.get("maxrss_mb")]
            longest = [r["longest_batch_ms"] for r in runs if r.get("longest_batch_ms") is not None]
            print(
                f"| {due:,} | {method} | {fmt([r['wall_s'] for r in runs])} | {fmt(seconds)} "
                f"| {due / statistics.median(seconds):,.0f} | {statistics.median(seconds) / floor_s:.2f} "
                f"| {fmt(wal, 0)} | {statistics.median(wal) * 1e6 / floor_wal:.2f} "
                f"| {fmt(rss, 0) if rss else ''} | {fmt(longest, 0) if longest else ''} "
                f"| {statistics.median(r['writer_p50_ms'] for r in runs):.1f} "
                f"| {statistics.median(r['writer_p99_ms'] for r in runs):.1f} |"
            )
    if not any(r["method"] == "reporting" for r in results):
        return
    print()
    print("| due rows | metrics SQL ms | status SQL ms |")
    print("|---|---|---|")
    for r in results:
        if r["method"] == "reporting":
            print(f"| {r['due']:,} | {fmt(r['metrics_ms'], 1)} | {fmt(r['status_ms'], 1)} |")


def variants(args: argparse.Namespace) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    due = args.size
    template = build_template(args.admin_url, due, args.live, args.revoked, now)
    total = due + args.live + args.revoked
    results = []
    try:
        names = ["floor", *VARIANTS]
        for _rep in range(args.reps):
            for name in names:
                work = (
                    (lambda url: floor(url, now))
                    if name == "floor"
                    else (lambda url, name=name: variant(url, now, name, args.batch_size))
                )
                result = on_fresh_copy(args.admin_url, template, work)
                check(result, due, total)
                results.append({**result, "due": due, "cutoff": str(now)})
                print(f"  {name}: {result['statement_s']:.2f} s", file=sys.stderr)
    finally:
        drop(args.admin_url, template)
    save("variants", results)
    print_scaling(results)


def startup(args: argparse.Namespace) -> None:
    """The hourly run when nothing is due: the tool against the import of its own stack."""
    name = f"skybot_bench_noop_{uuid.uuid4().hex[:6]}"
    with admin(args.admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(args.admin_url, name)
    from skybot_cleanup.app_schema import app_metadata

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"), poolclass=sa.pool.NullPool)
    app_metadata().create_all(engine)
    engine.dispose()
    python = str(Path(sys.executable))
    commands = {
        "stack import (the floor)": [
            python,
            "-c",
            "import sqlalchemy, sqlalchemy.dialects.postgresql.psycopg, psycopg, typer, pydantic_settings, structlog",
        ],
        "skybot-cleanup refresh-tokens (nothing due)": [str(TOOL), "refresh-tokens", "--quiet"],
        "skybot-cleanup --version": [str(TOOL), "--version"],
        "psql DELETE (nothing due)": [
            "psql",
            "-X",
            "-q",
            "-d",
            url,
            "-c",
            """DELETE FROM "RefreshToken" WHERE "expiresAt" < now() AT TIME ZONE 'UTC' """
            """AND "revokedAt" IS NULL""",
        ],
    }
    env = {**os.environ, "DATABASE_URL": url, "SKYBOT_CLEANUP_LOG_FORMAT": "json"}
    timings: dict[str, list[float]] = {label: [] for label in commands}
    try:
        subprocess.run(commands["skybot-cleanup refresh-tokens (nothing due)"], env=env, check=True)  # history tables
        for _ in range(args.runs):
            for label, command in commands.items():  # interleaved, so drift hits every command alike
                started = time.perf_counter()
                subprocess.run(command, env=env, check=True, capture_output=True)
                timings[label].append((time.perf_counter() - started) * 1000)
    finally:
        drop(args.admin_url, name)
    save("startup", [{"command": label, "ms": values} for label, values in timings.items()])
    print("| command | wall ms, median (min–max) | over the floor ms |")
    print("|---|---|---|")
    floor_ms = statistics.median(timings["stack import (the floor)"])
    for label, values in timings.items():
        print(f"| {label} | {fmt(values, 0)} | {statistics.median(values) - floor_ms:+.0f} |")


RELATION_SIZES = """
SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c
WHERE c.oid = '"RefreshToken"'::regclass
   OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = '"RefreshToken"'::regclass)
ORDER BY 1
"""


def aftermath(args: argparse.Namespace) -> None:
    """What a big delete leaves for VACUUM: its time and WAL, and the table and index
    sizes before and after (autovacuum off on the copy, so the VACUUM measured is ours)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    template = build_template(args.admin_url, args.size, args.live, args.revoked, now, shuffled=args.shuffled)
    results = []
    try:
        for _rep, compression in [(rep, c) for rep in range(args.reps) for c in ("off", "lz4")]:
            name = fresh_copy(args.admin_url, template)
            try:
                with psycopg.connect(database_url(args.admin_url, name), autocommit=True) as conn:
                    # Full-page images dominate a delete's WAL: how much does compressing them save?
                    conn.execute(f"SET wal_compression = {compression}")
                    conn.execute('ALTER TABLE "RefreshToken" SET (autovacuum_enabled = off)')
                    before = dict(conn.execute(RELATION_SIZES).fetchall())
                    steps = {}
                    for step, sql, params in (
                        ("delete", FLOOR_SQL, {"cutoff": now}),
                        ("vacuum", 'VACUUM "RefreshToken"', None),
                    ):
                        start, started = wal_position(conn), time.perf_counter()
                        conn.execute(sql, params)
                        steps[step] = {"s": time.perf_counter() - started, "wal_bytes": wal_since(conn, start)}
                    after = dict(conn.execute(RELATION_SIZES).fetchall())
                results.append(
                    {"due": args.size, "wal_compression": compression, "steps": steps, "before": before, "after": after}
                )
                print(
                    f"  wal_compression={compression}: delete {steps['delete']['s']:.2f} s, "
                    f"vacuum {steps['vacuum']['s']:.2f} s",
                    file=sys.stderr,
                )
            finally:
                drop(args.admin_url, name)
    finally:
        drop(args.admin_url, template)
    save(f"aftermath-{args.size}" + ("-shuffled" if args.shuffled else ""), results)
    print("| step | wal_compression | seconds | WAL MB | WAL bytes per deleted row |")
    print("|---|---|---|---|---|")
    for step in ("delete", "vacuum"):
        for compression in ("off", "lz4"):
            runs = [r for r in results if r["wal_compression"] == compression]
            seconds = [r["steps"][step]["s"] for r in runs]
            wal = [r["steps"][step]["wal_bytes"] for r in runs]
            per_row = [w / args.size for w in wal]
            print(f"| {step} | {compression} | {fmt(seconds)} | {fmt([w / 1e6 for w in wal], 0)} | {fmt(per_row, 0)} |")
    print()
    print("| relation | MB before | MB after VACUUM |")
    print("|---|---|---|")
    for relation in results[0]["before"]:
        print(
            f"| {relation} | {results[0]['before'][relation] / 1e6:.0f} "
            f"| {statistics.median(r['after'][relation] for r in results) / 1e6:.0f} |"
        )


def layouts(args: argparse.Namespace) -> None:
    """Each layout against its floor: where the due rows lie decides what a batch costs."""
    results: list[dict[str, Any]] = []
    due = args.size
    total = due + args.live + args.revoked
    for layout in (LAYOUTS[name] for name in args.layouts):
        # Each layout seeded relative to the real time just before it: the runs follow
        # within minutes, well inside the hours between the due and the live rows.
        now = datetime.now(UTC).replace(tzinfo=None)
        cutoff = now - layout.retention
        template = build_layout(args.admin_url, layout, due, args.live, args.revoked, now)
        first_run(database_url(args.admin_url, template))
        methods: list[Callable[[str], dict[str, Any]]] = [
            lambda url, layout=layout, cutoff=cutoff: floor(url, cutoff, layout.due_sql),
            lambda url, layout=layout, cutoff=cutoff: tool(url, cutoff, None, task=layout.task),
            lambda url, layout=layout, cutoff=cutoff: tool(url, cutoff, args.batch_size, task=layout.task),
        ]
        try:
            for _rep in range(args.reps):
                for work in methods:
                    result = on_fresh_copy(args.admin_url, template, work, due_sql=layout.due_sql, settle=True)
                    row = {**result, "layout": layout.name, "task": layout.task, "due": due, "cutoff": str(cutoff)}
                    results.append(row)
                    save("layouts", results)  # a failed check below still leaves what was measured
                    print(
                        f"  {layout.name} {result['method']}: {result['statement_s']:.2f} s, {result['rows']:,} rows",
                        file=sys.stderr,
                    )
                    check(result, due, total)
        finally:
            drop(args.admin_url, template)
    print_layouts(results)


def print_layouts(results: list[dict[str, Any]]) -> None:
    print(
        "| layout | task | method | statement s | × floor time | WAL MB | × floor WAL | rows | batches "
        "| longest batch ms | writer p50 ms | writer p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layout in dict.fromkeys(r["layout"] for r in results):
        rows = [r for r in results if r["layout"] == layout]
        floor_s = statistics.median(r["statement_s"] for r in rows if r["method"] == "floor")
        floor_wal = statistics.median(r["wal_bytes"] for r in rows if r["method"] == "floor")
        for method in dict.fromkeys(r["method"] for r in rows):
            runs = [r for r in rows if r["method"] == method]
            seconds = [r["statement_s"] for r in runs]
            wal = [r["wal_bytes"] / 1e6 for r in runs]
            batches = [r["batches"] for r in runs if r.get("batches") is not None]
            longest = [r["longest_batch_ms"] for r in runs if r.get("longest_batch_ms") is not None]
            print(
                f"| {layout} | {runs[0]['task']} | {method} | {fmt(seconds)} "
                f"| {statistics.median(seconds) / floor_s:.2f} | {fmt(wal, 1)} "
                f"| {statistics.median(wal) * 1e6 / floor_wal:.2f} | {statistics.median(r['rows'] for r in runs):,.0f} "
                f"| {fmt(batches, 0) if batches else ''} | {fmt(longest, 0) if longest else ''} "
                f"| {statistics.median(r['writer_p50_ms'] for r in runs):.1f} "
                f"| {statistics.median(r['writer_p99_ms'] for r in runs):.1f} |"
            )


# -- coexist: the app's own statements beside each method -------------------------------------

APP_NAME = "skybot-bench-app"


def returning(table: str, columns: str) -> str:
    """Prisma's column list: every scalar column, qualified."""
    return ", ".join(f'"public"."{table}"."{column}"' for column in columns.split())


RT = returning(
    "RefreshToken",
    "id token userAccountId accountId ipAddress userAgent deviceInfo expiresAt revokedAt revokedReason "
    "lastUsedAt createdAt updatedAt",
)
IK = returning(
    "IdempotencyKey", "id key accountId endpoint method requestBody statusCode responseBody createdAt expiresAt"
)
ML = returning("MagicLink", "id email token used expiresAt createdAt")
# The statements as Prisma 6/7 sends them (see docs on the app's queries): each its own
# autocommit statement, parameters bound, LIMIT/OFFSET as parameters.
APP_SQL = {
    "refresh: select token": f"""SELECT {RT} FROM "public"."RefreshToken"
        WHERE ("public"."RefreshToken"."token" = %s AND 1=1) LIMIT %s OFFSET %s""",
    "refresh: select user": """SELECT "public"."UserAccount"."id", "public"."UserAccount"."accountId"
        FROM "public"."UserAccount" WHERE "public"."UserAccount"."id" IN (%s) OFFSET %s""",
    "refresh: select account": """SELECT "public"."Account"."id" FROM "public"."Account"
        WHERE "public"."Account"."id" IN (%s) OFFSET %s""",
    "refresh: update": f"""UPDATE "public"."RefreshToken" SET "lastUsedAt" = %s, "updatedAt" = %s
        WHERE ("public"."RefreshToken"."id" = %s AND 1=1) RETURNING {RT}""",
    "login: insert": f"""INSERT INTO "public"."RefreshToken" ("id", "token", "userAccountId", "accountId",
        "ipAddress", "userAgent", "deviceInfo", "expiresAt", "lastUsedAt", "createdAt", "updatedAt")
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {RT}""",
    "logout: select": f"""SELECT {RT} FROM "public"."RefreshToken"
        WHERE ("public"."RefreshToken"."token" = %s AND 1=1) LIMIT %s OFFSET %s""",
    "logout: update": f"""UPDATE "public"."RefreshToken" SET "revokedAt" = %s, "revokedReason" = %s,
        "updatedAt" = %s WHERE ("public"."RefreshToken"."id" = %s AND 1=1) RETURNING {RT}""",
    "logout-all: update": """UPDATE "public"."RefreshToken" SET "revokedAt" = %s, "revokedReason" = %s,
        "updatedAt" = %s WHERE ("public"."RefreshToken"."userAccountId" = %s
        AND "public"."RefreshToken"."revokedAt" IS NULL)""",
    "idempotency: select": f"""SELECT {IK} FROM "public"."IdempotencyKey"
        WHERE ("public"."IdempotencyKey"."key" = %s AND 1=1) LIMIT %s OFFSET %s""",
    "idempotency: insert": f"""INSERT INTO "public"."IdempotencyKey" ("id", "key", "accountId", "endpoint", "method",
        "requestBody", "statusCode", "responseBody", "createdAt", "expiresAt")
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {IK}""",
    "idempotency: update": f"""UPDATE "public"."IdempotencyKey" SET "statusCode" = %s, "responseBody" = %s
        WHERE ("public"."IdempotencyKey"."key" = %s AND 1=1) RETURNING {IK}""",
    "idempotency: replay": f"""SELECT {IK} FROM "public"."IdempotencyKey"
        WHERE ("public"."IdempotencyKey"."key" = %s AND 1=1) LIMIT %s OFFSET %s""",
    "magic-link: insert": f"""INSERT INTO "public"."MagicLink" ("id", "email", "token", "used", "expiresAt",
        "createdAt") VALUES (%s, %s, %s, %s, %s, %s) RETURNING {ML}""",
    "magic-link: select": f"""SELECT {ML} FROM "public"."MagicLink" WHERE ("public"."MagicLink"."email" = %s
        AND "public"."MagicLink"."token" = %s AND "public"."MagicLink"."used" = %s) LIMIT %s OFFSET %s""",
    "magic-link: update": f"""UPDATE "public"."MagicLink" SET "used" = %s
        WHERE ("public"."MagicLink"."id" = %s AND 1=1) RETURNING {ML}""",
}

# Requests a second, by kind, and the threads (connections) that send them. The shares
# are the app report's estimate (refresh 60 %, idempotency 20 %, login 5 %, logout 3 %,
# logout-all and magic links 1 % each), scaled to ~115 requests a second in all.
REALISTIC: dict[str, tuple[float, int]] = {
    kind: (share * 115 / 90, threads)
    for kind, share, threads in (
        ("refresh", 60, 4),
        ("idempotency", 20, 2),
        ("login", 5, 1),
        ("logout", 3, 1),
        ("logout-all", 1, 1),
        ("magic-link", 1, 1),
    )
}
# A security incident or a password-reset wave: ~100 logout-alls a second, each locking
# a user's hundreds of unrevoked rows across the heap, beside the realistic mix.
RATES: dict[str, dict[str, tuple[float, int]]] = {
    "realistic": REALISTIC,
    "revoke-heavy": {**REALISTIC, "logout-all": (100 + REALISTIC["logout-all"][0], 4)},
}
USERS = 2000


def utc() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def live_token(g: int) -> str:
    """The token of seeded live row g, as LAYOUT_SEED computes it."""
    return hashlib.sha256(f"{g}live".encode()).hexdigest()


def app_id() -> str:
    # 'w' like the Writer's rows, so the checks can leave the app's own rows out.
    return f"w{uuid.uuid4().hex[:24]}"


class AppLoad:
    """The app's requests from paced threads, one autocommit connection each, recording
    every statement's latency and every error's SQLSTATE by statement kind."""

    def __init__(self, url: str, rates: dict[str, tuple[float, int]], live: int):
        self.url, self.rates, self.live = url, rates, live
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.latencies_ms: dict[str, list[float]] = {kind: [] for kind in APP_SQL}
        self.errors: dict[str, Counter[str]] = {kind: Counter() for kind in APP_SQL}
        self.requests: Counter[str] = Counter()
        self.threads = [
            threading.Thread(target=self.run, args=(kind, rate / threads, seed), daemon=True)
            for kind, (rate, threads) in rates.items()
            for seed in range(threads)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join()

    def run(self, kind: str, rate: float, seed: int) -> None:
        request = getattr(self, kind.replace("-", "_"))
        rng = random.Random(f"{kind}/{seed}")
        interval = 1 / rate
        # prepare_threshold=None: never prepared, as adapter-pg sends them (unnamed statements).
        with psycopg.connect(
            self.url, autocommit=True, prepare_threshold=None, application_name=f"{APP_NAME}/{kind}"
        ) as conn:
            next_at = time.monotonic() + rng.random() * interval
            while not self.stop_event.wait(max(0.0, next_at - time.monotonic())):
                request(conn, rng)
                with self.lock:
                    self.requests[kind] += 1
                # Paced, not as fast as possible: a request held by a lock delays this
                # thread's next ones, but a long stall is not made up in a burst.
                next_at = max(next_at + interval, time.monotonic() - 1)

    def execute(self, conn: psycopg.Connection[Any], kind: str, params: tuple[Any, ...]) -> list[Any] | None:
        """One statement, timed; None when it failed (the error counted by SQLSTATE)."""
        started = time.perf_counter()
        try:
            cursor = conn.execute(APP_SQL[kind], params)
            rows = cursor.fetchall() if cursor.description else []
        except psycopg.Error as exc:
            with self.lock:
                self.errors[kind][exc.sqlstate or type(exc).__name__] += 1
            return None
        elapsed = (time.perf_counter() - started) * 1000
        with self.lock:
            self.latencies_ms[kind].append(elapsed)
        return rows

    # -- the requests: the statements each sends, in order ------------------------------------

    def refresh(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        rows = self.execute(conn, "refresh: select token", (live_token(rng.randint(1, self.live)), 1, 0))
        if not rows:
            return
        token = rows[0]
        users = self.execute(conn, "refresh: select user", (token[2], 0))
        if users:
            self.execute(conn, "refresh: select account", (users[0][1], 0))
        if token[8] is None and token[7] > utc():  # revoked or expired: 401 in app code, no UPDATE
            now = utc()
            self.execute(conn, "refresh: update", (now, now, token[0]))

    def login(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        user = rng.randint(1, USERS)
        now = utc()
        lifetime = timedelta(days=3) if rng.random() < 0.3 else timedelta(hours=12)  # remember me, or not
        device = Jsonb({"browser": "Safari", "os": "iOS", "device": "iPhone"})
        params = (app_id(), uuid.uuid4().hex * 2, f"ua_{user}", f"acc_{user % 200 + 1}", "203.0.113.7",
                  "Mozilla/5.0", device, now + lifetime, now, now, now)  # fmt: skip
        self.execute(conn, "login: insert", params)

    def logout(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        rows = self.execute(conn, "logout: select", (live_token(rng.randint(1, self.live)), 1, 0))
        if rows:
            now = utc()
            self.execute(conn, "logout: update", (now, "user_logout", now, rows[0][0]))

    def logout_all(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        now = utc()
        self.execute(conn, "logout-all: update", (now, "user_logout_all", now, f"ua_{rng.randint(1, USERS)}"))

    def idempotency(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        key, account, now = uuid.uuid4().hex, f"acc_{rng.randint(1, 200)}", utc()
        if self.execute(conn, "idempotency: select", (key, 1, 0)) != []:
            return
        body = Jsonb({"conversationId": f"conv_{rng.randint(1, 5000)}", "text": "x" * 80})
        params = (app_id(), key, account, "/api/messages", "POST", body, None, Jsonb(None),
                  now, now + timedelta(hours=24))  # fmt: skip
        if self.execute(conn, "idempotency: insert", params) is None:
            return
        response = Jsonb({"id": f"msg_{uuid.uuid4().hex[:12]}", "status": "sent"})
        self.execute(conn, "idempotency: update", (201, response, key))
        self.execute(conn, "idempotency: replay", (key, 1, 0))  # the client retries: the cached response

    def magic_link(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        email, token, now = f"user{rng.randint(1, USERS)}@example.com", os.urandom(32).hex(), utc()
        self.execute(conn, "magic-link: insert", (app_id(), email, token, False, now + timedelta(minutes=15), now))
        rows = self.execute(conn, "magic-link: select", (email, token, False, 1, 0))
        if rows:
            self.execute(conn, "magic-link: update", (True, rows[0][0]))

    def summary(self, seconds: float) -> dict[str, Any]:
        statements = {
            kind: {
                "count": len(values),
                "errors": dict(self.errors[kind]),
                "p50_ms": percentile(values, 50) if values else None,
                "p99_ms": percentile(values, 99) if values else None,
                "max_ms": max(values) if values else None,
            }
            for kind, values in self.latencies_ms.items()
        }
        errors = sum((Counter(counts) for counts in self.errors.values()), Counter())
        return {
            "seconds": seconds,
            "requests": dict(self.requests),
            "statements": statements,
            "errors": dict(errors),
            "deadlocks": errors.get("40P01", 0),
            # Every latency, to 0.1 ms, as {latency: requests}: pooled over repetitions when
            # printed, and small enough to keep in the results.
            "latency_counts_ms": {
                kind: dict(sorted(Counter(round(value, 1) for value in values).items()))
                for kind, values in self.latencies_ms.items()
            },
        }


class LockSampler(threading.Thread):
    """Every 50 ms, the backends of one database waiting for a lock: each statement seen
    waiting counts once, by its (pid, query_start), the app's by request kind."""

    def __init__(self, admin_url: str, database: str):
        super().__init__(daemon=True)
        self.admin_url, self.database, self.stop = admin_url, database, threading.Event()
        self.seen: set[tuple[int, datetime, str]] = set()

    def run(self) -> None:
        with admin(self.admin_url) as conn:
            while not self.stop.wait(0.05):
                rows = conn.execute(
                    """SELECT pid, query_start, application_name FROM pg_stat_activity
                       WHERE datname = %s AND wait_event_type = 'Lock' AND backend_type = 'client backend'""",
                    (self.database,),
                ).fetchall()
                self.seen.update((pid, started, name) for pid, started, name in rows)

    def summary(self) -> dict[str, Any]:
        app = Counter(name.split("/", 1)[1] for _, _, name in self.seen if name.startswith(f"{APP_NAME}/"))
        return {
            "lock_waits": sum(app.values()),
            "lock_waits_by_request": dict(app),
            "deletion_lock_waits": sum(1 for _, _, name in self.seen if not name.startswith(f"{APP_NAME}/")),
        }


COEXIST_CHECK = """
SELECT count(*) FILTER (WHERE "expiresAt" < %(cutoff)s AND "revokedAt" IS NULL),
       count(*) FILTER (WHERE "expiresAt" < %(cutoff)s AND "revokedReason" IN ('user_logout', 'user_logout_all')),
       count(*) FILTER (WHERE "expiresAt" >= %(cutoff)s OR "revokedReason" = 'logout'),
       count(*)
FROM "RefreshToken" WHERE id NOT LIKE 'w%%'
"""


def coexist_accounting(url: str, cutoff: datetime, due: int, live: int, revoked: int) -> dict[str, Any]:
    """Where the seeded due rows went under load: deleted, revoked by the app first (a
    logout-all: no longer due), or left; and whether any row that was not due was deleted.
    The seeded revoked rows say 'logout', the app's revocations 'user_logout[_all]'."""
    with psycopg.connect(url) as conn:
        row = conn.execute(COEXIST_CHECK, {"cutoff": cutoff}).fetchone()
    assert row is not None
    left, revoked_by_app, kept, present = (int(value) for value in row)
    return {
        "left_due": left,
        "due_revoked_by_app": revoked_by_app,
        "not_due_kept": kept,
        "not_due_expected": live + revoked,
        "deleted": due + live + revoked - present,
    }


def coexist_window(
    args: argparse.Namespace,
    template: str,
    rate: str,
    label: str,
    method: Callable[[str], dict[str, Any]] | None,
    seconds: float,
    cutoff: datetime,
) -> dict[str, Any]:
    """The app's load on a fresh copy for at least `seconds`, and for the whole of the
    method when there is one: started a second before it, stopped after it returns."""
    name = fresh_copy(args.admin_url, template, settle=True)
    url = database_url(args.admin_url, name)
    load, sampler = AppLoad(url, RATES[rate], args.live), LockSampler(args.admin_url, name)
    outcome: dict[str, Any] = {}
    try:
        started = time.monotonic()
        load.start()
        sampler.start()
        if method:
            time.sleep(1.0)  # the load steady before the method starts
            with admin(args.admin_url) as conn:
                start, method_started = wal_position(conn), time.monotonic()
                try:
                    outcome = method(url)
                except psycopg.Error as exc:  # a deadlock victim, say: a result under load
                    outcome = {"rows": 0, "statement_s": time.monotonic() - method_started, "error": exc.sqlstate}
                # The app's WAL included (its revocations write plenty): context, not the method's cost.
                outcome["wal_bytes_with_app"] = wal_since(conn, start)
            time.sleep(0.5)  # and after it, to see what it left behind
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        load.stop()
        sampler.stop.set()
        sampler.join()
        window = {"rate": rate, "method": label, **load.summary(time.monotonic() - started), **sampler.summary()}
        if method:
            window["deletion"] = {key: outcome.get(key) for key in DELETION_KEYS}
            window["accounting"] = coexist_accounting(url, cutoff, args.size, args.live, args.revoked)
    finally:
        load.stop_event.set()
        sampler.stop.set()
        drop(args.admin_url, name)
    return window


DELETION_KEYS = (
    "statement_s",
    "wall_s",
    "rows",
    "wal_bytes_with_app",
    "batches",
    "longest_batch_ms",
    "remaining",
    "status",
    "error",
)


def coexist_problems(window: dict[str, Any]) -> list[str]:
    """What must hold even under load: nothing that was not due deleted, every seeded
    due row deleted, revoked by the app first, or reported left by the run (unless the
    run failed, a deadlock victim say: that shows in the tables, and leaves rows)."""
    if "accounting" not in window:
        return []
    a, d, where = window["accounting"], window["deletion"], f"{window['rate']} / {window['method']}"
    problems = []
    if a["not_due_kept"] != a["not_due_expected"]:
        problems.append(f"{where}: {a['not_due_expected'] - a['not_due_kept']} rows that were not due are gone")
    failed = d.get("error") is not None or d.get("status") not in (None, "ok")
    if a["left_due"] > (d.get("remaining") or 0) and not failed:
        problems.append(f"{where}: {a['left_due']} due rows left, the run reported {d.get('remaining') or 0}")
    if d.get("rows") != a["deleted"]:
        problems.append(f"{where}: the method reported {d.get('rows')} rows, {a['deleted']} are gone")
    return problems


def coexist(args: argparse.Namespace) -> None:
    """The app's statements beside each method, on the mixed layout, at two rates."""
    layout = LAYOUTS["mixed"]
    now = datetime.now(UTC).replace(tzinfo=None)
    keys = max(args.size // 10, 1000)  # idempotency-keys' backlog: background, no method runs on it
    template = build_layout(args.admin_url, layout, args.size, args.live, args.revoked, now, idempotency_keys=keys)
    methods: list[tuple[str, Callable[[str], dict[str, Any]] | None]] = [
        ("baseline", None),
        ("floor", lambda url: floor(url, now)),
        ("single transaction", lambda url: tool(url, now, None, strict=False)),
        (f"batched {args.batch_size:,}", lambda url: tool(url, now, args.batch_size, strict=False)),
    ]
    windows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        for rate in RATES:
            for _rep, (label, method) in itertools.product(range(args.reps), methods):
                seconds = args.seconds / 2 if method is None else args.seconds
                window = coexist_window(args, template, rate, label, method, seconds, now)
                windows.append(window)
                save("coexist", windows)
                problems += coexist_problems(window)
                deletion = window.get("deletion") or {}
                print(
                    f"  {rate} {label}: {sum(window['requests'].values()):,} requests, errors {window['errors']}, "
                    f"{window['lock_waits']} lock waits"
                    + (
                        f"; deleted {deletion.get('rows')} in {deletion.get('statement_s') or 0:.2f} s"
                        if method
                        else ""
                    ),
                    file=sys.stderr,
                )
    finally:
        drop(args.admin_url, template)
    print_coexist(windows)
    if problems:
        raise SystemExit("\n".join(["coexist: the deletions were not exact:", *problems]))


def print_coexist(windows: list[dict[str, Any]]) -> None:
    print(
        "| rate | method | window s | app requests | req/s | logout-all/s | errors by SQLSTATE | deadlocks "
        "| app lock-waits | deletion lock-waits | deletion s | rows deleted | due revoked by the app first "
        "| due left (run's count) | run status |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for w in windows:
        requests = sum(w["requests"].values())
        errors = ", ".join(f"{state}: {n}" for state, n in sorted(w["errors"].items())) or "none"
        d, a = w.get("deletion") or {}, w.get("accounting") or {}
        status = d.get("error") or d.get("status") or ("ok" if d else "")
        seconds = f"{d['statement_s']:.2f}" if d.get("statement_s") is not None else ""
        rows = f"{d['rows']:,}" if d.get("rows") is not None else ""
        # The run's own count of what it left (rows the app held) beside what was left after the window.
        left = f"{a['left_due']} ({d.get('remaining') or 0})" if a else ""
        print(
            f"| {w['rate']} | {w['method']} | {w['seconds']:.1f} | {requests:,} | {requests / w['seconds']:.0f} "
            f"| {w['requests'].get('logout-all', 0) / w['seconds']:.1f} | {errors} | {w['deadlocks']} "
            f"| {w['lock_waits']} | {w['deletion_lock_waits']} | {seconds} | {rows} "
            f"| {a.get('due_revoked_by_app', '')} | {left} | {status} |"
        )
    for rate in dict.fromkeys(w["rate"] for w in windows):
        # Each statement's latencies pooled over the repetitions of a method: a p99 of a
        # few hundred requests is its two or three slowest, one stall can make it.
        pooled: dict[str, dict[str, list[float]]] = {}
        for w in windows:
            if w["rate"] == rate:
                for kind, counts in w["latency_counts_ms"].items():
                    values = [float(latency) for latency, n in counts.items() for _ in range(n)]
                    pooled.setdefault(w["method"], {}).setdefault(kind, []).extend(values)
        reps = Counter(w["method"] for w in windows if w["rate"] == rate)
        print()
        print(
            f"{rate}: per statement (requests of the fewest-sampled method), p50 / p99 ms (p99 × the baseline's), "
            f"pooled over {max(reps.values())} windows"
        )
        print()
        print("| statement | " + " | ".join(pooled) + " |")
        print("|---|" + "---|" * len(pooled))
        for kind in APP_SQL:
            cells = []
            base = pooled["baseline"][kind]
            for method, latencies in pooled.items():
                values = latencies[kind]
                if not values:
                    cells.append("–")
                    continue
                cell = f"{percentile(values, 50):.1f} / {percentile(values, 99):.1f}"
                if method != "baseline" and base:
                    cell += f" (×{percentile(values, 99) / percentile(base, 99):.1f})"
                cells.append(cell)
            fewest = min(len(latencies[kind]) for latencies in pooled.values())
            print(f"| {kind} ({fewest:,}) | " + " | ".join(cells) + " |")


def save(mode: str, results: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count()}
    (RESULTS / f"{mode}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")


def chart(_args: argparse.Namespace) -> None:
    """docs/img/scaling.png from benchmarks/results/scaling.json (matplotlib: the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((RESULTS / "scaling.json").read_text())["results"]
    runs = [r for r in results if r["method"] != "reporting"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    sizes = sorted({r["due"] for r in runs})
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [
        (axes[0][0], "seconds (statement; the tool's run without start-up)", lambda r: r["statement_s"], "log"),
        (axes[0][1], "WAL written, MB", lambda r: r["wal_bytes"] / 1e6, "log"),
        (axes[1][0], "rows per second", lambda r: r["due"] / r["statement_s"], "linear"),
    ]
    for axis, title, value, scale in panels:
        for method in methods:
            medians, lows, highs = [], [], []
            for size in sizes:
                median, low, high = median_spread(
                    [value(r) for r in runs if r["method"] == method and r["due"] == size]
                )
                medians.append(median)
                lows.append(median - low)
                highs.append(high - median)
            axis.errorbar(sizes, medians, yerr=[lows, highs], marker="o", capsize=3, label=method)
        axis.set_xscale("log")
        axis.set_yscale(scale)
        axis.set_xlabel("due rows")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    axis = axes[1][1]
    reporting = [r for r in results if r["method"] == "reporting"]
    for key, label in (("metrics_ms", "metrics snapshot"), ("status_ms", "status")):
        xs = [r["due"] for r in reporting]
        axis.plot(xs, [statistics.median(r[key]) for r in reporting], marker="o", label=label)
    axis.axhline(100, color="grey", linestyle="--", label="target: 100 ms")
    axis.set_xscale("log")
    axis.set_xlabel("due rows")
    axis.set_title("SQL time of metrics and status, ms")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.suptitle("skybot-cleanup refresh-tokens: median of the repetitions, bars from min to max")
    figure.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(CHART, dpi=110)
    print(f"wrote {CHART}")


# The targets the chart marks: a method's median over the floor's, time and WAL.
LAYOUT_TARGETS = {"single transaction": (1.1, 1.1), "batched": (1.3, 1.1)}


def layouts_chart(args: argparse.Namespace) -> None:
    """docs/img/layouts.png from results/layouts.json: per layout, time and WAL over the
    floor for the single transaction and the batches, dashed at each target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((RESULTS / "layouts.json").read_text())["results"]
    layouts = list(dict.fromkeys(r["layout"] for r in results))
    figure, axes = plt.subplots(1, len(layouts), figsize=(3.6 * len(layouts), 4.6), squeeze=False)
    width = 0.38
    for axis, layout in zip(axes[0], layouts, strict=True):
        runs = [r for r in results if r["layout"] == layout]
        floors = [r for r in runs if r["method"] == "floor"]
        base = {
            "time": statistics.median(r["statement_s"] for r in floors),
            "WAL": statistics.median(r["wal_bytes"] for r in floors),
        }
        methods = [m for m in dict.fromkeys(r["method"] for r in runs) if m != "floor"]
        for i, method in enumerate(methods):
            target = LAYOUT_TARGETS["batched" if method.startswith("batched") else method]
            for j, (measure, key) in enumerate((("time", "statement_s"), ("WAL", "wal_bytes"))):
                median, low, high = median_spread([r[key] / base[measure] for r in runs if r["method"] == method])
                x = j + (i - (len(methods) - 1) / 2) * width
                axis.bar(
                    x, median, width * 0.9, yerr=[[median - low], [high - median]], capsize=3,
                    color=f"C{i}", label=method if j == 0 else None,
                )  # fmt: skip
                axis.hlines(target[j], x - width / 2, x + width / 2, colors="black", linestyles="dashed")
        axis.axhline(1, color="grey", linewidth=0.8)
        axis.set_xticks([0, 1], ["time × floor", "WAL × floor"])
        axis.set_title(f"{layout} ({runs[0]['task']})")
        axis.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("median over the floor's (bars: min–max)")
    axes[0][0].plot([], [], color="black", linestyle="dashed", label="target")
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3)  # below: off the bars
    due = results[0]["due"]
    figure.suptitle(f"skybot-cleanup on four heap layouts, {due:,} due rows: time and WAL over the plain DELETE")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


def main() -> None:
    global RESULTS  # one switch for every mode's save and the charts' reads
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON results go (and are read)")
    sub = parser.add_subparsers(dest="mode", required=True)
    start = sub.add_parser("startup")
    start.add_argument("--runs", type=int, default=20)
    for name in ("scaling", "variants", "aftermath", "layouts", "coexist"):
        mode = sub.add_parser(name)
        mode.add_argument("--reps", type=int, default=3)
        mode.add_argument("--live", type=int, default=500_000, help="live tokens beside the due ones")
        mode.add_argument("--revoked", type=int, default=100_000, help="revoked tokens (kept by this task)")
        mode.add_argument("--batch-size", type=int, default=10_000)
        if name == "layouts":
            mode.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
        if name == "aftermath":
            mode.add_argument("--shuffled", action="store_true", help="rows in random order, not expiry order")
        if name == "coexist":
            mode.add_argument(
                "--seconds", type=float, default=20, help="each method's window at least (baseline: half)"
            )
        if name == "scaling":
            mode.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
        else:
            mode.add_argument("--size", type=int, default=1_000_000)
    sub.add_parser("chart")
    sub.add_parser("layouts-chart").add_argument("--output", type=Path, default=LAYOUTS_CHART)
    args = parser.parse_args()
    RESULTS = args.results_dir
    modes = {
        "startup": startup,
        "scaling": scaling,
        "variants": variants,
        "aftermath": aftermath,
        "layouts": layouts,
        "coexist": coexist,
        "chart": chart,
        "layouts-chart": layouts_chart,
    }
    modes[args.mode](args)


if __name__ == "__main__":
    main()
