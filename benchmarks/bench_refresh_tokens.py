#!/usr/bin/env python3
"""skybot-cleanup against a plain DELETE through psql, on identical fresh copies.

    python benchmarks/bench_refresh_tokens.py --sizes 100000 1000000

Builds a "RefreshToken" table shaped like the app's (same columns, indexes and
foreign keys, realistic widths), seeds it once per size into a template database
(due rows among live and revoked ones), then for every method clones a fresh copy,
starts a concurrent app writer, runs the method and records: wall time (process
start included), the time the tool itself reports (its run without process
start-up), rows/s, ratio to the floor, the tool's peak RSS, its longest batch,
and the writer's p50/p99 statement latency. Prints a Markdown table.
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
from datetime import UTC, datetime
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
TOOL = Path(sys.executable).with_name("skybot-cleanup")

SCHEMA = """
CREATE TABLE "Account" (id text PRIMARY KEY, name text NOT NULL);
CREATE TABLE "UserAccount" (id text PRIMARY KEY, "accountId" text NOT NULL REFERENCES "Account"(id),
                            email text NOT NULL UNIQUE);
CREATE TABLE "RefreshToken" (
    id text PRIMARY KEY,
    token text NOT NULL,
    "userAccountId" text NOT NULL REFERENCES "UserAccount"(id) ON DELETE CASCADE ON UPDATE CASCADE,
    "accountId" text NOT NULL REFERENCES "Account"(id) ON DELETE CASCADE ON UPDATE CASCADE,
    "ipAddress" text,
    "userAgent" text,
    "deviceInfo" jsonb,
    "expiresAt" timestamp(3) NOT NULL,
    "revokedAt" timestamp(3),
    "revokedReason" text,
    "lastUsedAt" timestamp(3),
    "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" timestamp(3) NOT NULL
);
CREATE UNIQUE INDEX "RefreshToken_token_key" ON "RefreshToken"(token);
CREATE INDEX "RefreshToken_userAccountId_idx" ON "RefreshToken"("userAccountId");
CREATE INDEX "RefreshToken_expiresAt_idx" ON "RefreshToken"("expiresAt");
CREATE INDEX "RefreshToken_revokedAt_idx" ON "RefreshToken"("revokedAt");
"""

# cuid-like ids (25 chars), sha256-hex tokens, real-looking user agents and device info.
SEED = """
INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "ipAddress", "userAgent", "deviceInfo",
                            "expiresAt", "revokedAt", "revokedReason", "lastUsedAt", "createdAt", "updatedAt")
SELECT 'c' || substr(md5(g::text || kind), 1, 24),
       encode(sha256((g::text || kind)::bytea), 'hex'),
       'ua_' || (mod(g, 20000) + 1), 'acc_' || (mod(mod(g, 20000) + 1, 200) + 1),
       '203.0.' || mod(g, 250) || '.' || mod(g, 200),
       'Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Version/17.1 Mobile/15E148',
       jsonb_build_object('os', 'iOS', 'osVersion', '17.1', 'device', 'iPhone15,2', 'app', '2.4.' || mod(g, 9)),
       CASE kind WHEN 'due' THEN %(now)s - mod(g, 2592000) * interval '1 second' - interval '1 minute'
                 WHEN 'live' THEN %(now)s + mod(g, 2592000) * interval '1 second' + interval '1 hour'
                 ELSE %(now)s - mod(g, 864000) * interval '1 second' END,
       CASE kind WHEN 'revoked' THEN %(now)s - mod(g, 5184000) * interval '1 second' END,
       CASE kind WHEN 'revoked' THEN 'logout' END,
       %(now)s - interval '1 day', %(now)s - interval '30 days', %(now)s - interval '1 day'
FROM (SELECT g, kind FROM generate_series(1, %(due)s) g, (VALUES ('due')) k(kind)
      UNION ALL SELECT g, 'live' FROM generate_series(1, %(live)s) g
      UNION ALL SELECT g, 'revoked' FROM generate_series(1, %(revoked)s) g) rows
-- Tokens are written as they are issued, so the heap is roughly in expiry order.
ORDER BY 8;
"""

FLOOR_SQL = """DELETE FROM "RefreshToken" WHERE "expiresAt" < '{cutoff}' AND "revokedAt" IS NULL"""


def admin(url: str):
    return psycopg.connect(url, autocommit=True)


def build_template(admin_url: str, due: int, live: int, revoked: int, now: datetime) -> str:
    name = f"skybot_bench_tpl_{due}"
    with admin(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(database_url(admin_url, name), autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("""INSERT INTO "Account" SELECT 'acc_' || g, 'Account ' || g FROM generate_series(1, 200) g""")
        conn.execute("""INSERT INTO "UserAccount" SELECT 'ua_' || g, 'acc_' || (mod(g, 200) + 1),
                        'user' || g || '@example.com' FROM generate_series(1, 20000) g""")
        started = time.monotonic()
        conn.execute(SEED, {"now": now, "due": due, "live": live, "revoked": revoked})
        conn.execute("VACUUM ANALYZE")
        print(f"  seeded {due + live + revoked:,} rows in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return name


def database_url(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + name


def fresh_copy(admin_url: str, template: str) -> str:
    name = f"skybot_bench_{uuid.uuid4().hex[:8]}"
    with admin(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        conn.execute("CHECKPOINT")
    return name


def drop(admin_url: str, name: str) -> None:
    with admin(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
                for sql, params in (
                    (
                        """INSERT INTO "RefreshToken"
                               (id, token, "userAccountId", "accountId", "expiresAt", "updatedAt")
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
                ):
                    started = time.perf_counter()
                    conn.execute(sql, params)
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                time.sleep(0.01)


def measured(command: list[str], env: dict[str, str]) -> dict:
    """Run a command in a wrapper process that reports its wall time and peak RSS alone."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "print(json.dumps({'wall_s': wall, 'rc': p.returncode, 'stdout': p.stdout, 'stderr': p.stderr,\n"
        "                  'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", wrapper, *command], env=env, capture_output=True, text=True)
    return json.loads(completed.stdout)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_method(admin_url: str, template: str, label: str, batch_size: int | None, cutoff: str) -> dict:
    name = fresh_copy(admin_url, template)
    url = database_url(admin_url, name)
    env = {
        **os.environ,
        "SKYBOT_CLEANUP_LOG_FORMAT": "json",
        "SKYBOT_CLEANUP_LOG_LEVEL": "debug",
        "DATABASE_URL": url,
        "PGHOST": "",
        "PGDATABASE": "",
    }
    if batch_size is None and label == "floor":
        command = ["psql", "-X", "-q", "-d", url, "-c", FLOOR_SQL.format(cutoff=cutoff)]
    else:
        command = [str(TOOL), "refresh-tokens", "--json"]
        if batch_size:
            command += ["--batch-size", str(batch_size)]
    writer = Writer(url)
    writer.start()
    time.sleep(0.5)  # a steady writer before the run starts
    writer.latencies_ms.clear()
    result = measured(command, env)
    writer.stop.set()
    writer.join()
    with psycopg.connect(url) as conn:
        left = conn.execute(
            """SELECT count(*) FROM "RefreshToken" WHERE "expiresAt" < %s AND "revokedAt" IS NULL
                               AND id NOT LIKE 'w%%'""",
            (cutoff,),
        ).fetchone()[0]
    drop(admin_url, name)
    if result["rc"] != 0:
        raise SystemExit(f"{label} failed: {result['stderr'][-2000:]}")
    batches = [json.loads(line) for line in result["stderr"].splitlines() if '"event": "batch"' in line]
    output = json.loads(result["stdout"]) if label != "floor" else {}
    return {
        "label": label,
        "wall_s": result["wall_s"],
        "maxrss_mb": result["maxrss_kb"] / 1024,
        "rows": output.get("rows"),
        "left": left,
        "in_tool_s": output["duration_ms"] / 1000 if output else None,
        "longest_batch_ms": max((b["duration_ms"] for b in batches), default=None),
        "writer_p50_ms": percentile(writer.latencies_ms, 50),
        "writer_p99_ms": percentile(writer.latencies_ms, 99),
        "writer_ops": len(writer.latencies_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="due rows")
    parser.add_argument("--live", type=int, default=200_000, help="live tokens beside the due ones")
    parser.add_argument("--revoked", type=int, default=50_000, help="revoked tokens (kept by this task)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    args = parser.parse_args()

    now = datetime.now(UTC).replace(tzinfo=None)
    # Every method gets the same cutoff, through the same data: rows seeded relative to `now`
    # with a one-minute margin, so "now" at run time selects exactly the seeded due rows.
    cutoff = now.isoformat(sep=" ", timespec="milliseconds")
    print(
        "| due rows | method | wall s | in-tool s | rows/s | × floor | peak RSS MB | longest batch ms "
        "| writer p50 ms | writer p99 ms | writer ops |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for due in args.sizes:
        template = build_template(args.admin_url, due, args.live, args.revoked, now)
        try:
            methods = [("floor", None), ("single transaction", None)] + [
                (f"batched {size:,}", size) for size in args.batch_sizes
            ]
            floor = None
            for label, batch_size in methods:
                r = run_method(args.admin_url, template, label, batch_size, cutoff)
                floor = floor or r["wall_s"]
                assert r["left"] == 0, f"{label} left {r['left']} due rows"
                assert r["rows"] in (None, due), f"{label} deleted {r['rows']} rows, expected {due}"
                longest = "" if r["longest_batch_ms"] is None else f"{r['longest_batch_ms']:.0f}"
                rss = "" if label == "floor" else f"{r['maxrss_mb']:.0f}"
                in_tool = "" if r["in_tool_s"] is None else f"{r['in_tool_s']:.2f}"
                print(
                    f"| {due:,} | {label} | {r['wall_s']:.2f} | {in_tool} | {due / r['wall_s']:,.0f} | "
                    f"{r['wall_s'] / floor:.2f} | {rss} | {longest} | {r['writer_p50_ms']:.1f} | "
                    f"{r['writer_p99_ms']:.1f} | {r['writer_ops']} |",
                    flush=True,
                )
        finally:
            drop(args.admin_url, template)


if __name__ == "__main__":
    main()
