"""`startup`: the hourly run when nothing is due, against the import of the tool's own stack."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from benchmarks.databases import create, drop, unique_name
from benchmarks.measure import fmt, save
from benchmarks.methods import TOOL, tool_env
from benchmarks.seeding import create_app_tables

FLOOR = "stack import (the floor)"
NOOP = "skybot-cleanup refresh-tokens (nothing due)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=20, help="interleaved runs of each command")


def run(args: argparse.Namespace) -> None:
    name = unique_name("skybot_bench_noop")
    url = create(args.admin_url, name)
    commands = {
        FLOOR: [
            sys.executable,
            "-c",
            "import sqlalchemy, sqlalchemy.dialects.postgresql.psycopg, psycopg, typer, pydantic_settings, structlog",
        ],
        NOOP: [str(TOOL), "refresh-tokens", "--quiet"],
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
    env = tool_env(url)
    timings: dict[str, list[float]] = {label: [] for label in commands}
    try:
        create_app_tables(url)
        subprocess.run(commands[NOOP], env=env, check=True, capture_output=True)  # its history tables
        for _ in range(args.runs):
            for label, command in commands.items():  # interleaved, so drift hits every command alike
                started = time.perf_counter()
                subprocess.run(command, env=env, check=True, capture_output=True)
                timings[label].append((time.perf_counter() - started) * 1000)
    finally:
        drop(args.admin_url, name)
    save(args.results_dir, "startup", [{"command": label, "ms": values} for label, values in timings.items()])
    print("| command | wall ms, median (min–max) | over the floor ms |")
    print("|---|---|---|")
    floor_ms = statistics.median(timings[FLOOR])
    for label, values in timings.items():
        print(f"| {label} | {fmt(values, 0)} | {statistics.median(values) - floor_ms:+.0f} |")
