"""`variants`: batch statement shapes as raw SQL from one connection, without the tool."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from benchmarks.databases import DUE, drop
from benchmarks.measure import check, log, save
from benchmarks.methods import Method, floor, on_fresh_copy
from benchmarks.scaling import print_scaling
from benchmarks.seeding import EXPIRY_ORDER, build_template


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
        done += int(row[0])
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


def run(args: argparse.Namespace) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    due = args.size
    template = build_template(args.admin_url, EXPIRY_ORDER, due, args.live, args.revoked, now)
    total = due + args.live + args.revoked

    def raw(name: str) -> Method:
        return lambda url: variant(url, now, name, args.batch_size)

    methods: list[Method] = [lambda url: floor(url, now), *(raw(name) for name in VARIANTS)]
    results: list[dict[str, Any]] = []
    try:
        for _rep in range(args.reps):
            for work in methods:
                result = on_fresh_copy(args.admin_url, template, work)
                check(result, due, total)
                results.append({**result, "due": due, "cutoff": str(now)})
                log(f"{result['method']}: {result['statement_s']:.2f} s")
    finally:
        drop(args.admin_url, template)
    save(args.results_dir, "variants", results)
    print_scaling(results)
