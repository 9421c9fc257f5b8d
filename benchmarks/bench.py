#!/usr/bin/env python3
"""skybot-cleanup against its floors, side by side, on identical fresh copies.

    python benchmarks/bench.py startup                  # the hourly no-op run vs the stack's import
    python benchmarks/bench.py variants --size 1000000  # batch statement shapes, as raw SQL
    python benchmarks/bench.py scaling --sizes 10000 100000 1000000 5000000 10000000
    python benchmarks/bench.py aftermath --size 1000000 # what the delete leaves for VACUUM (--shuffled: rows
                                                        # in random order, one due row per page at worst)
    python benchmarks/bench.py chart                    # docs/img/scaling.png from the saved results

Every measurement is repeated (--reps, default 3) and reported as the median with its
spread (min-max). Data: the app's own "RefreshToken" (and its parent tables, indexes and
foreign keys) from skybot_cleanup.app_schema, seeded into a template database per size, in
expiry order as the app writes it, with live and revoked rows beside the due ones. Every
method runs on its own copy (CREATE DATABASE ... TEMPLATE, then CHECKPOINT), with an app
writer inserting and refreshing tokens ~100 times a second, and the script asserts that
each one deleted exactly the due rows and nothing else. Results go to
benchmarks/results/<mode>.json and print as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOOL = Path(sys.executable).with_name("skybot-cleanup")
CHART = HERE.parent / "docs" / "img" / "scaling.png"

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


def fresh_copy(admin_url: str, template: str) -> str:
    name = f"skybot_bench_{uuid.uuid4().hex[:8]}"
    with admin(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        conn.execute("CHECKPOINT")
    return name


def drop(admin_url: str, name: str) -> None:
    with admin(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def left_due(url: str, cutoff: datetime) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"""SELECT count(*) FROM "RefreshToken" WHERE {DUE} AND id NOT LIKE 'w%%'""", {"cutoff": cutoff}
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


def on_fresh_copy(admin_url: str, template: str, work: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """work(url) on a fresh copy, with the app writer running, measuring WAL and latency."""
    name = fresh_copy(admin_url, template)
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
            "left": left_due(url, result["cutoff"]),
            "total": total_rows(url),
        }
    finally:
        writer.stop.set()
        drop(admin_url, name)
    return result


# -- the methods ------------------------------------------------------------------------------


def floor(url: str, cutoff: datetime) -> dict[str, Any]:
    """The plain DELETE, timed around the statement (start-up excluded)."""
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        cursor = conn.execute(FLOOR_SQL, {"cutoff": cutoff})
        elapsed = time.perf_counter() - started
        return {"method": "floor", "wall_s": elapsed, "statement_s": elapsed, "rows": cursor.rowcount, "cutoff": cutoff}


def tool(url: str, cutoff: datetime, batch_size: int | None) -> dict[str, Any]:
    """The console script, as cron runs it (history on). Its cutoff is its own "now",
    which selects the same rows: the seeded due rows end a minute before the seed's now."""
    env = {**os.environ, "DATABASE_URL": url, "SKYBOT_CLEANUP_LOG_FORMAT": "json", "PGHOST": "", "PGDATABASE": ""}
    command = [str(TOOL), "refresh-tokens", "--json"] + (["--batch-size", str(batch_size)] if batch_size else [])
    result = measured(command, env)
    if result["rc"] != 0:
        raise SystemExit(f"the tool failed: {result['stderr'][-2000:]}")
    output = json.loads(result["stdout"])
    return {
        "method": f"batched {batch_size:,}" if batch_size else "single transaction",
        "wall_s": result["wall_s"],
        "statement_s": output["duration_ms"] / 1000,
        "rows": output["rows"],
        "cutoff": cutoff,
        "maxrss_mb": result["maxrss_kb"] / 1024,
        "longest_batch_ms": output.get("longest_batch_ms"),
        "batches": output.get("batches"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    sub = parser.add_subparsers(dest="mode", required=True)
    start = sub.add_parser("startup")
    start.add_argument("--runs", type=int, default=20)
    for name in ("scaling", "variants", "aftermath"):
        mode = sub.add_parser(name)
        mode.add_argument("--reps", type=int, default=3)
        mode.add_argument("--live", type=int, default=500_000, help="live tokens beside the due ones")
        mode.add_argument("--revoked", type=int, default=100_000, help="revoked tokens (kept by this task)")
        mode.add_argument("--batch-size", type=int, default=10_000)
        if name == "aftermath":
            mode.add_argument("--shuffled", action="store_true", help="rows in random order, not expiry order")
        if name == "scaling":
            mode.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
        else:
            mode.add_argument("--size", type=int, default=1_000_000)
    sub.add_parser("chart")
    args = parser.parse_args()
    modes = {"startup": startup, "scaling": scaling, "variants": variants, "aftermath": aftermath, "chart": chart}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
