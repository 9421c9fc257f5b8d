"""`scaling`: the floor, the single transaction and the batched run at each size, and the SQL
time of `metrics` and `status` on the same table."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from benchmarks.databases import database_url, drop
from benchmarks.measure import check, floor_medians, fmt, grouped, log, save
from benchmarks.methods import Method, floor, on_fresh_copy, tool
from benchmarks.seeding import EXPIRY_ORDER, build_template


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="due rows")


def reporting_sql_time(url: str) -> dict[str, float]:
    """The SQL time of a metrics snapshot and of status (the one judgement, rendered),
    in-process (no start-up), in transactions set up as those commands set theirs up."""
    from skybot_cleanup import db, health, metrics, status
    from skybot_cleanup.clock import utc_now
    from skybot_cleanup.settings import load

    settings = load({"database_url": url, "history": False}).settings

    def status_of(run: db.RunConnection, schema: str, now: datetime) -> status.Status:
        return status.render(health.judge(run, settings, schema, now), settings, now)

    def snapshot(run: db.RunConnection, schema: str, now: datetime) -> metrics.Snapshot:
        return metrics.take_snapshot(run, settings, schema, now)

    engine = db.create_engine(db.parse_database_url(url), settings.session(), "bench")
    timings: dict[str, float] = {}
    try:
        readers: tuple[tuple[str, Callable[[db.RunConnection, str, datetime], object]], ...] = (
            ("metrics_ms", snapshot),
            ("status_ms", status_of),
        )
        for name, read in readers:
            with db.run_transaction(
                engine, settings.session(), "bench", read_only=True, planner=db.INDEX_WALK_PLANNER
            ) as run:
                read(run, "public", utc_now())  # warm: connection and catalog caches
                started = time.perf_counter()
                read(run, "public", utc_now())
                timings[name] = (time.perf_counter() - started) * 1000
    finally:
        engine.dispose()
    return timings


def run(args: argparse.Namespace) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    cutoff = now
    results: list[dict[str, Any]] = []
    for due in args.sizes:
        template = build_template(args.admin_url, EXPIRY_ORDER, due, args.live, args.revoked, now)
        total = due + args.live + args.revoked
        try:
            reporting = [reporting_sql_time(database_url(args.admin_url, template)) for _ in range(args.reps)]
            methods: list[Method] = [
                lambda url: floor(url, cutoff),
                lambda url: tool(url, cutoff, None),
                lambda url: tool(url, cutoff, args.batch_size),
            ]
            for _rep in range(args.reps):
                for work in methods:
                    result = on_fresh_copy(args.admin_url, template, work)
                    check(result, due, total)
                    results.append({**result, "due": due, "cutoff": str(result["cutoff"])})
                    log(f"{due:,} {result['method']}: {result['statement_s']:.2f} s")
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
    save(args.results_dir, "scaling", results)
    print_scaling(results)


def print_scaling(results: list[dict[str, Any]]) -> None:
    print(
        "| due rows | method | wall s | statement s | rows/s | × floor | WAL MB | × floor WAL | peak RSS MB "
        "| longest batch ms | writer p50 ms | writer p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs_by_size = grouped([r for r in results if r["method"] != "reporting"], "due")
    for due, rows in sorted(runs_by_size.items()):
        floor_s, floor_wal = floor_medians(rows)
        for method, runs in grouped(rows, "method").items():
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
