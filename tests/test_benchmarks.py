"""The benchmarks keep running: every mode that measures the tool (and the floors the docs
set beside it), at a tiny size and one repetition, on the test server, with its results in
a temporary directory, never over benchmarks/results. Plus the seeding the modes' exactness
checks rest on: each layout holds exactly the due rows its task deletes.

Each mode exits non-zero when a method deleted other rows than the due ones; the tests
also read what it saved."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import REPOSITORY, database_url, unavailable

from benchmarks import standby
from benchmarks.cli import MODES
from benchmarks.seeding import EXPIRY_ORDER, LAYOUTS, SHUFFLED, create_app_tables, seed_rows
from skybot_cleanup.clock import utc_now

RESULTS = REPOSITORY / "benchmarks" / "results"
DUE, LIVE, REVOKED = 300, 200, 100
TINY = ["--live", str(LIVE), "--revoked", str(REVOKED), "--reps", "1"]


def bench(results_dir: Path, *args: str, admin_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m benchmarks ...`, as the docs run it, from the repository."""
    command = [sys.executable, "-m", "benchmarks", "--results-dir", str(results_dir)]
    if admin_url:
        command += ["--admin-url", admin_url]
    completed = subprocess.run(
        [*command, *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, f"{args[0]} exited {completed.returncode}:\n{completed.stderr[-3000:]}"
    return completed


def saved(results_dir: Path, mode: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = json.loads((results_dir / f"{mode}.json").read_text())["results"]
    return results


def fingerprint(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.glob("*"))}


@pytest.fixture
def results_dir(tmp_path: Path) -> Any:
    """A results directory of the test's own; the repository's results are left as they were."""
    before = fingerprint(RESULTS)
    yield tmp_path / "results"
    assert fingerprint(RESULTS) == before, "a smoke run changed benchmarks/results"


def exact(results: list[dict[str, Any]], due: int = DUE) -> None:
    for result in results:
        assert (result["rows"], result["left"], result["total"]) == (due, 0, LIVE + REVOKED), result["method"]


# -- the seeding ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [EXPIRY_ORDER, SHUFFLED, *LAYOUTS.values()], ids=lambda layout: layout.name)
def test_each_layout_holds_exactly_the_due_rows_its_task_deletes(layout, pg_admin, pg_server_url):
    """At the seed's cutoff, and at the later one of a run that starts minutes after the
    seed, the task's predicate selects the seeded due rows, and no other."""
    name = f"skybot_bench_seed_{layout.name}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        url = database_url(pg_server_url, name)
        create_app_tables(url)
        now = utc_now()
        with psycopg.connect(url, autocommit=True) as conn:
            seed_rows(conn, layout, DUE, LIVE, REVOKED, now)
            counts = [
                conn.execute(
                    f"""SELECT count(*) FILTER (WHERE {layout.due_sql} AND id LIKE 'c%%'), count(*)
                        FROM "RefreshToken" """,
                    {"cutoff": now - layout.retention + later},
                ).fetchone()
                for later in (timedelta(0), timedelta(minutes=30))
            ]
    finally:
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert counts == [(DUE, DUE + LIVE + REVOKED)] * 2


# -- the modes --------------------------------------------------------------------------------


def test_the_scripts_command_line_lists_every_mode():
    """`python benchmarks/bench.py`, the command the docs have always quoted, is the package's."""
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--help"], cwd=REPOSITORY, capture_output=True, text=True, check=True
    )
    for mode in MODES:
        assert mode in completed.stdout


def test_startup(pg_server_url, results_dir):
    output = bench(results_dir, "startup", "--runs", "1", admin_url=pg_server_url).stdout
    commands = {result["command"]: result["ms"] for result in saved(results_dir, "startup")}
    assert list(commands) == [
        "stack import (the floor)",
        "skybot-cleanup refresh-tokens (nothing due)",
        "skybot-cleanup --version",
        "psql DELETE (nothing due)",
    ]
    assert all(len(ms) == 1 for ms in commands.values())
    assert "| skybot-cleanup refresh-tokens (nothing due) |" in output


def test_scaling(pg_server_url, results_dir):
    bench(results_dir, "scaling", "--sizes", str(DUE), *TINY, admin_url=pg_server_url)
    results = saved(results_dir, "scaling")
    runs = [r for r in results if r["method"] != "reporting"]
    assert [r["method"] for r in runs] == ["floor", "single transaction", "batched 10,000"]
    exact(runs)
    [reporting] = [r for r in results if r["method"] == "reporting"]
    assert len(reporting["metrics_ms"]) == len(reporting["status_ms"]) == 1


def test_variants(pg_server_url, results_dir):
    bench(results_dir, "variants", "--size", str(DUE), *TINY, admin_url=pg_server_url)
    results = saved(results_dir, "variants")
    assert [r["method"] for r in results] == [
        "floor",
        "ctid + FOR UPDATE SKIP LOCKED (previous)",
        "ctid, no row lock",
        "index range (kept)",
        "index range, synchronous_commit off",
    ]
    exact(results)


def test_aftermath(pg_server_url, results_dir):
    # pglz: every server has it (lz4, the docs' choice, needs a server built with it).
    args = ["aftermath", "--size", str(DUE), "--shuffled", "--wal-compression", "pglz", *TINY]
    bench(results_dir, *args, admin_url=pg_server_url)
    results = saved(results_dir, f"aftermath-{DUE}-shuffled")
    assert [r["wal_compression"] for r in results] == ["off", "pglz"]
    for result in results:
        assert result["steps"]["delete"]["wal_bytes"] > 0 and result["steps"]["vacuum"]["wal_bytes"] > 0
        assert set(result["before"]) == set(result["after"]) >= {"RefreshToken"}


def test_layouts(pg_server_url, results_dir):
    """The never-analyzed mass tie: revoked-tokens, the one layout whose task is not refresh-tokens."""
    bench(results_dir, "layouts", "--size", str(DUE), "--layouts", "masstie", *TINY, admin_url=pg_server_url)
    results = saved(results_dir, "layouts")
    assert [(r["layout"], r["task"], r["method"]) for r in results] == [
        ("masstie", "revoked-tokens", "floor"),
        ("masstie", "revoked-tokens", "single transaction"),
        ("masstie", "revoked-tokens", "batched 10,000"),
    ]
    exact(results)


def test_coexist(pg_server_url, results_dir):
    args = ["coexist", "--size", str(DUE), "--seconds", "0.5", "--rates", "realistic", *TINY]
    output = bench(results_dir, *args, admin_url=pg_server_url).stdout
    windows = saved(results_dir, "coexist")
    assert [w["method"] for w in windows] == ["baseline", "floor", "single transaction", "batched 10,000"]
    for window in windows[1:]:
        accounting = window["accounting"]
        assert accounting["not_due_kept"] == accounting["not_due_expected"]
        assert window["deletion"]["rows"] == accounting["deleted"]
        assert accounting["deleted"] + accounting["due_revoked_by_app"] + accounting["left_due"] == DUE
    assert sum(windows[0]["requests"].values()) > 0
    assert "realistic: per statement" in output


def test_remote(pg_server_url, results_dir):
    """Round trips counted per connection (metrics opens several), the batched run's
    batches from its --json, and both templates: with nothing due, and with a backlog."""
    args = ["remote", "--size", str(DUE), "--delays-ms", "5", "--commands", "noop", "batched", "metrics", *TINY]
    bench(results_dir, *args, admin_url=pg_server_url)
    results = {r["command"]: r for r in saved(results_dir, "remote")}
    assert list(results) == ["refresh-tokens, nothing due", "refresh-tokens, batched", "metrics"]
    for result in results.values():
        assert result["delay_ms"] == 5 and result["connections"] >= 1
        assert sum(result["per_connection"]) == result["round_trips"] > 0
        assert len(result["per_connection"]) == result["connections"]
    assert results["refresh-tokens, nothing due"]["rows"] == 0
    assert results["refresh-tokens, batched"]["rows"] == DUE and results["refresh-tokens, batched"]["batches"] >= 1


def test_replica(results_dir):
    """Its own primary and standby (PostgreSQL 15, as another OS user, in a network
    namespace behind tc's tbf): every method exact on the primary and on the standby, the
    lag sampled, and nothing left behind."""
    reason = standby.missing()
    if reason:
        unavailable(reason)
    completed = bench(results_dir, "replica", "--size", str(DUE), "--sleep-ms", "10", *TINY)
    results = saved(results_dir, "replica")
    methods = ["plain DELETE", "tool, defaults", "tool, --sleep-ms 10"]
    if "skipping --max-replica-lag" not in completed.stderr:
        methods += ["tool, --max-replica-lag 2", "tool, --max-replica-lag 0 (off)"]
    assert [r["method"] for r in results] == methods
    exact(results)
    for result in results:
        assert (result["standby_left"], result["standby_total"]) == (0, LIVE + REVOKED)
        assert result["wal_bytes"] > 0 and result["samples"] >= 1
        assert result["link_s"] == pytest.approx(result["wal_bytes"] * 8 / 100e6)
    # What it made, as it announced it, is gone: the namespace (its veth pair and qdisc with
    # it) and the clusters' directory.
    match = re.search(r"standby: namespace (\S+), clusters in (\S+)", completed.stderr)
    assert match, completed.stderr
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert match.group(1) not in namespaces
    assert not Path(match.group(2)).exists()
