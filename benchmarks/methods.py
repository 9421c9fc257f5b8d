"""The methods measured against each other: the plain `DELETE` (the floor) and the installed
console script, and the frame around each: a fresh copy, the app writing beside it, the
run's WAL, and the counts its exactness is checked by."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.app import Writer
from benchmarks.databases import (
    DUE,
    admin,
    database_url,
    drop,
    fresh_copy,
    left_due,
    total_rows,
    wal_position,
    wal_since,
)
from benchmarks.measure import measured, percentile

TOOL = Path(sys.executable).with_name("skybot-cleanup")

Method = Callable[[str], dict[str, Any]]


def tool_env(url: str, **settings: str) -> dict[str, str]:
    """The environment the console script runs in: this URL only (no PG* default may
    point it elsewhere), JSON logs."""
    return {
        **os.environ,
        "DATABASE_URL": url,
        "SKYBOT_CLEANUP_LOG_FORMAT": "json",
        "PGHOST": "",
        "PGDATABASE": "",
        **settings,
    }


def first_run(url: str) -> None:
    """The tool's first run on a template (magic-links: nothing due), so the measured runs
    find its history tables there, as every run after a deployment's first does."""
    subprocess.run([str(TOOL), "magic-links", "--json"], env=tool_env(url), capture_output=True, check=True)


def floor(url: str, cutoff: datetime, due_sql: str = DUE) -> dict[str, Any]:
    """The plain DELETE, timed around the statement (start-up excluded)."""
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        cursor = conn.execute(f"""DELETE FROM "RefreshToken" WHERE {due_sql}""", {"cutoff": cutoff})
        elapsed = time.perf_counter() - started
        return {"method": "floor", "wall_s": elapsed, "statement_s": elapsed, "rows": cursor.rowcount, "cutoff": cutoff}


def tool(
    url: str,
    cutoff: datetime,
    batch_size: int | None,
    *,
    task: str = "refresh-tokens",
    strict: bool = True,
    options: Sequence[str] = (),
    label: str | None = None,
    keep_output: bool = False,
) -> dict[str, Any]:
    """The console script, as cron runs it (history on). Its cutoff is its own "now",
    which selects the same rows: the seeded due rows end a minute before the seed's now.
    batch_size None: --single-transaction (the tool's default is batched, so it must be
    asked for). strict=False: a failed run is a result (under the app's load), not an exit.
    options: more of the command's options (--sleep-ms 300, say), named in `label`.
    keep_output: the run's whole --json result too (fields newer than this script)."""
    mode = ["--batch-size", str(batch_size)] if batch_size else ["--single-transaction"]
    result = measured([str(TOOL), task, "--json", *mode, *options], tool_env(url))
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
    kept = {"output": output} if keep_output else {}
    return kept | {
        "method": label or (f"batched {batch_size:,}" if batch_size else "single transaction"),
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
        "stopped_by": output.get("stopped_by"),
        "rc": result["rc"],
        "error": output.get("error"),
    }


def on_fresh_copy(
    admin_url: str,
    template: str,
    work: Method,
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
