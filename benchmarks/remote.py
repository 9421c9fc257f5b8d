"""`remote`: every command the operators schedule or run by hand, by the installed console
script, through a TCP proxy that delays each round trip (benchmarks.netpath) by 0, 10 and
40 ms: per command its round trips (in all and per connection), its connections and its
wall time, and for the batched run its batches (from --json), so that round trips per
batch can be worked out.

Each command runs on its own fresh copy: the no-op hourly run on a table with nothing due
(only live and revoked tokens), the others on one with --size due rows beside them. Both
templates have had the tool's first run (its history tables exist), as a deployed
database has.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from benchmarks.databases import database_url, drop, fresh_copy, left_due, total_rows
from benchmarks.measure import log, save
from benchmarks.methods import TOOL, first_run, tool_env
from benchmarks.netpath import delayed
from benchmarks.seeding import EXPIRY_ORDER, build_template

SIZE = 100_000
NOOP = "refresh-tokens, nothing due"
BATCHED = "refresh-tokens, batched"


@dataclass(frozen=True)
class Command:
    name: str  # for --commands
    label: str
    argv: tuple[str, ...]
    backlog: bool  # on the table with due rows (else: nothing due)
    deletes: bool = False  # the run must delete exactly the due rows


def commands(batch_size: int) -> list[Command]:
    return [
        Command("noop", NOOP, ("refresh-tokens", "--json"), backlog=False),
        Command(
            "batched",
            BATCHED,
            ("refresh-tokens", "--json", "--batch-size", str(batch_size)),
            backlog=True,
            deletes=True,
        ),
        Command("dry-run", "refresh-tokens --dry-run", ("refresh-tokens", "--dry-run", "--json"), backlog=True),
        Command("metrics", "metrics", ("metrics", "--json"), backlog=True),
        Command("status", "status", ("status", "--json"), backlog=True),
        Command("check", "check", ("check", "--json"), backlog=True),
    ]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--delays-ms", type=float, nargs="+", default=[0, 10, 40], help="round-trip delays to add (default 0 10 40)"
    )
    names = [command.name for command in commands(0)]
    parser.add_argument("--commands", nargs="+", choices=names, default=names, help="the commands to run (default all)")


def parse_output(stdout: str) -> list[dict[str, Any]]:
    """The command's --json output: one object, or one per line (check's findings)."""
    text = stdout.strip()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return whole if isinstance(whole, list) else [whole]


def measure(command: Command, url: str, delay_ms: float, cutoff: datetime, due: int, total: int) -> dict[str, Any]:
    """One command on a fresh copy through a proxy `delay_ms` away."""
    with delayed(url, delay_ms / 1000) as (proxy, proxied):
        started = time.perf_counter()
        completed = subprocess.run(
            [str(TOOL), *command.argv], env=tool_env(proxied), capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - started
        counts = proxy.counts()
    try:
        output = parse_output(completed.stdout)
    except json.JSONDecodeError:
        raise SystemExit(
            f"{command.label}: no JSON (exit {completed.returncode}): {completed.stderr[-2000:]}"
        ) from None
    # status and check exit 1 on what they find (a job never run, say): a result. Anything
    # else, and any failure of a cleanup run, means the counts are not the command's.
    if completed.returncode not in (0, 1) or (command.argv[0] == "refresh-tokens" and completed.returncode):
        raise SystemExit(f"{command.label} exited {completed.returncode}: {completed.stderr[-2000:]}")
    result: dict[str, Any] = {
        "command": command.label,
        "argv": list(command.argv),
        "delay_ms": delay_ms,
        "round_trips": counts.round_trips,
        "per_connection": counts.per_connection,
        "connections": counts.connections,
        "wall_s": wall,
        "rc": completed.returncode,
    }
    if command.argv[0] == "refresh-tokens":
        run = output[0]
        result |= {"rows": run["rows"], "batches": run.get("batches"), "duration_ms": run["duration_ms"]}
    if command.deletes:
        left, kept = left_due(url, cutoff), total_rows(url)
        assert result["rows"] == due and left == 0, f"{command.label}: deleted {result['rows']}, {left} due left"
        assert kept == total - due, f"{command.label}: deleted {total - due - kept} rows that were not due"
    elif command.label == NOOP:
        assert result["rows"] == 0, f"{command.label}: deleted {result['rows']} rows"
    return result


def run(args: argparse.Namespace) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    due, total = args.size, args.size + args.live + args.revoked
    templates: dict[bool, str] = {}
    results: list[dict[str, Any]] = []
    try:
        for backlog in sorted({command.backlog for command in commands(0) if command.name in args.commands}):
            templates[backlog] = build_template(
                args.admin_url, EXPIRY_ORDER, due if backlog else 0, args.live, args.revoked, now
            )
            first_run(database_url(args.admin_url, templates[backlog]))
        for _rep in range(args.reps):
            for delay_ms in args.delays_ms:
                for command in (c for c in commands(args.batch_size) if c.name in args.commands):
                    name = fresh_copy(args.admin_url, templates[command.backlog])
                    try:
                        url = database_url(args.admin_url, name)
                        result = measure(command, url, delay_ms, now, due, total)
                    finally:
                        drop(args.admin_url, name)
                    results.append(result)
                    log(
                        f"{delay_ms:g} ms {command.label}: {result['round_trips']} round trips "
                        f"{result['per_connection']}, {result['wall_s']:.2f} s"
                    )
    finally:
        for template in templates.values():
            drop(args.admin_url, template)
    save(args.results_dir, "remote", results, due=due, live=args.live, revoked=args.revoked)
    print_remote(results)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def print_remote(results: list[dict[str, Any]]) -> None:
    delays = list(dict.fromkeys(r["delay_ms"] for r in results))
    slash = " / ".join(f"{d:g}" for d in delays)
    print(
        f"| command | connections | round trips per connection | round trips at {slash} ms "
        f"| wall s at {slash} ms | ms per round trip at {delays[-1]:g} ms |"
    )
    print("|---|---|---|---|---|---|")
    by_command: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for r in results:
        by_command.setdefault(r["command"], {}).setdefault(r["delay_ms"], []).append(r)
    for label, runs in by_command.items():
        last = runs[delays[-1]]
        trips = [median([r["round_trips"] for r in runs[d]]) for d in delays]
        walls = [median([r["wall_s"] for r in runs[d]]) for d in delays]
        # What each round trip cost in wall time beyond the undelayed run: the delay, if
        # the count is what the client waited on.
        per_trip = (walls[-1] - walls[0]) / trips[-1] * 1000 if trips[-1] and len(delays) > 1 else float("nan")
        print(
            f"| {label} | {last[0]['connections']} | {' + '.join(str(n) for n in last[0]['per_connection'])} "
            f"| {' / '.join(f'{t:g}' for t in trips)} | {' / '.join(f'{w:.2f}' for w in walls)} | {per_trip:.0f} |"
        )
    batched = [r for r in results if r["command"] == BATCHED and r["delay_ms"] == delays[-1]]
    noop = [r for r in results if r["command"] == NOOP and r["delay_ms"] == delays[-1]]
    if batched and noop:
        total, batches = median([r["round_trips"] for r in batched]), median([r["batches"] for r in batched])
        fixed = median([r["round_trips"] for r in noop])
        print()
        print(
            f"Batched run at {delays[-1]:g} ms: {total:g} round trips for {batches:g} batches "
            f"({batched[0]['rows']:,} rows): {(total - fixed) / batches:.2f} per batch beyond the no-op run's "
            f"{fixed:g}; issue 23's bound is 2 per batch + 12 = {2 * batches + 12:g}."
        )
