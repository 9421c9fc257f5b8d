"""`layouts`: each layout of the due rows against its floor: where the due rows lie decides
what a batch costs."""

from __future__ import annotations

import argparse
import statistics
from datetime import UTC, datetime
from typing import Any

from benchmarks.databases import database_url, drop
from benchmarks.measure import check, floor_medians, fmt, grouped, log, save
from benchmarks.methods import Method, first_run, floor, on_fresh_copy, tool
from benchmarks.seeding import LAYOUTS, Layout, build_template


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))


def methods(layout: Layout, cutoff: datetime, batch_size: int) -> list[Method]:
    return [
        lambda url: floor(url, cutoff, layout.due_sql),
        lambda url: tool(url, cutoff, None, task=layout.task),
        lambda url: tool(url, cutoff, batch_size, task=layout.task),
    ]


def run(args: argparse.Namespace) -> None:
    results: list[dict[str, Any]] = []
    due = args.size
    total = due + args.live + args.revoked
    for layout in (LAYOUTS[name] for name in args.layouts):
        # Each layout seeded relative to the real time just before it: the runs follow
        # within minutes, well inside the hours between the due and the live rows.
        now = datetime.now(UTC).replace(tzinfo=None)
        cutoff = now - layout.retention
        template = build_template(args.admin_url, layout, due, args.live, args.revoked, now)
        try:
            first_run(database_url(args.admin_url, template))
            for _rep in range(args.reps):
                for work in methods(layout, cutoff, args.batch_size):
                    result = on_fresh_copy(args.admin_url, template, work, due_sql=layout.due_sql, settle=True)
                    row = {**result, "layout": layout.name, "task": layout.task, "due": due, "cutoff": str(cutoff)}
                    results.append(row)
                    save(args.results_dir, "layouts", results)  # a failed check below still leaves what was measured
                    log(f"{layout.name} {result['method']}: {result['statement_s']:.2f} s, {result['rows']:,} rows")
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
    for layout, rows in grouped(results, "layout").items():
        floor_s, floor_wal = floor_medians(rows)
        for method, runs in grouped(rows, "method").items():
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
