"""Measuring and reporting: medians with their spread, a command timed in a process of its
own, the exactness check every deleting method passes, and the results files."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], digits: int = 2) -> str:
    """The median and, in brackets, the spread (min–max)."""
    median, low, high = median_spread(values)
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def grouped(results: list[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """The results by one field's value, in the order the values first appear."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result[key], []).append(result)
    return groups


def floor_medians(results: list[dict[str, Any]]) -> tuple[float, float]:
    """The floor's median statement time and WAL: what the other methods are measured against."""
    floors = [r for r in results if r["method"] == "floor"]
    return statistics.median(r["statement_s"] for r in floors), statistics.median(r["wal_bytes"] for r in floors)


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


def check(result: dict[str, Any], due: int, total: int) -> None:
    """The method deleted every due row and nothing else."""
    assert result["left"] == 0, f"{result['method']} left {result['left']} due rows"
    assert result["rows"] == due, f"{result['method']} deleted {result['rows']} rows, expected {due}"
    assert result["total"] == total - due, f"{result['method']} deleted rows that were not due"


def save(results_dir: Path, mode: str, results: list[dict[str, Any]], **meta: Any) -> Path:
    """results_dir/<mode>.json: when and where it was measured, and every result."""
    results_dir.mkdir(parents=True, exist_ok=True)
    about = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(), **meta}
    path = results_dir / f"{mode}.json"
    path.write_text(json.dumps({"meta": about, "results": results}, indent=1, default=str) + "\n")
    return path


def load(results_dir: Path, mode: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = json.loads((results_dir / f"{mode}.json").read_text())["results"]
    return results


def log(message: str) -> None:
    """Progress, on stderr: stdout carries the Markdown tables."""
    print(f"  {message}", file=sys.stderr, flush=True)
