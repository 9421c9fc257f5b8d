"""`coexist`: the app's own statements (benchmarks.app.AppLoad) beside each method, on fresh
copies of the mixed-lifetime layout, at the production mix and a revoke-heavy one. Per
statement kind: the latency, the errors by SQLSTATE and the statements that waited for a
lock; per deletion: where every seeded due row went."""

from __future__ import annotations

import argparse
import itertools
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import psycopg

from benchmarks.app import APP_SQL, RATES, AppLoad, LockSampler
from benchmarks.databases import admin, database_url, drop, fresh_copy, wal_position, wal_since
from benchmarks.measure import log, percentile, save
from benchmarks.methods import Method, floor, tool
from benchmarks.seeding import LAYOUTS, build_template


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=20, help="each method's window at least (baseline: half)")
    parser.add_argument("--rates", nargs="+", choices=list(RATES), default=list(RATES), help="the app's mixes")


COEXIST_CHECK = """
SELECT count(*) FILTER (WHERE "expiresAt" < %(cutoff)s AND "revokedAt" IS NULL),
       count(*) FILTER (WHERE "expiresAt" < %(cutoff)s AND "revokedReason" IN ('user_logout', 'user_logout_all')),
       count(*) FILTER (WHERE "expiresAt" >= %(cutoff)s OR "revokedReason" = 'logout'),
       count(*)
FROM "RefreshToken" WHERE id NOT LIKE 'w%%'
"""


def coexist_accounting(url: str, cutoff: datetime, due: int, live: int, revoked: int) -> dict[str, Any]:
    """Where the seeded due rows went under load: deleted, revoked by the app first (a
    logout-all: no longer due), or left; and whether any row that was not due was deleted.
    The seeded revoked rows say 'logout', the app's revocations 'user_logout[_all]'."""
    with psycopg.connect(url) as conn:
        row = conn.execute(COEXIST_CHECK, {"cutoff": cutoff}).fetchone()
    assert row is not None
    left, revoked_by_app, kept, present = (int(value) for value in row)
    return {
        "left_due": left,
        "due_revoked_by_app": revoked_by_app,
        "not_due_kept": kept,
        "not_due_expected": live + revoked,
        "deleted": due + live + revoked - present,
    }


def coexist_window(
    args: argparse.Namespace,
    template: str,
    rate: str,
    label: str,
    method: Method | None,
    seconds: float,
    cutoff: datetime,
) -> dict[str, Any]:
    """The app's load on a fresh copy for at least `seconds`, and for the whole of the
    method when there is one: started a second before it, stopped after it returns."""
    name = fresh_copy(args.admin_url, template, settle=True)
    url = database_url(args.admin_url, name)
    load, sampler = AppLoad(url, RATES[rate], args.live), LockSampler(args.admin_url, name)
    outcome: dict[str, Any] = {}
    try:
        started = time.monotonic()
        load.start()
        sampler.start()
        if method:
            time.sleep(1.0)  # the load steady before the method starts
            with admin(args.admin_url) as conn:
                start, method_started = wal_position(conn), time.monotonic()
                try:
                    outcome = method(url)
                except psycopg.Error as exc:  # a deadlock victim, say: a result under load
                    outcome = {"rows": 0, "statement_s": time.monotonic() - method_started, "error": exc.sqlstate}
                # The app's WAL included (its revocations write plenty): context, not the method's cost.
                outcome["wal_bytes_with_app"] = wal_since(conn, start)
            time.sleep(0.5)  # and after it, to see what it left behind
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        load.stop()
        sampler.stop.set()
        sampler.join()
        window = {"rate": rate, "method": label, **load.summary(time.monotonic() - started), **sampler.summary()}
        if method:
            window["deletion"] = {key: outcome.get(key) for key in DELETION_KEYS}
            window["accounting"] = coexist_accounting(url, cutoff, args.size, args.live, args.revoked)
    finally:
        load.stop_event.set()
        sampler.stop.set()
        drop(args.admin_url, name)
    return window


DELETION_KEYS = (
    "statement_s",
    "wall_s",
    "rows",
    "wal_bytes_with_app",
    "batches",
    "longest_batch_ms",
    "remaining",
    "status",
    "error",
)


def coexist_problems(window: dict[str, Any]) -> list[str]:
    """What must hold even under load: nothing that was not due deleted, every seeded
    due row deleted, revoked by the app first, or reported left by the run (unless the
    run failed, a deadlock victim say: that shows in the tables, and leaves rows)."""
    if "accounting" not in window:
        return []
    a, d, where = window["accounting"], window["deletion"], f"{window['rate']} / {window['method']}"
    problems = []
    if a["not_due_kept"] != a["not_due_expected"]:
        problems.append(f"{where}: {a['not_due_expected'] - a['not_due_kept']} rows that were not due are gone")
    failed = d.get("error") is not None or d.get("status") not in (None, "ok")
    if a["left_due"] > (d.get("remaining") or 0) and not failed:
        problems.append(f"{where}: {a['left_due']} due rows left, the run reported {d.get('remaining') or 0}")
    if d.get("rows") != a["deleted"]:
        problems.append(f"{where}: the method reported {d.get('rows')} rows, {a['deleted']} are gone")
    return problems


def run(args: argparse.Namespace) -> None:
    """The app's statements beside each method, on the mixed layout, at each rate."""
    layout = LAYOUTS["mixed"]
    now = datetime.now(UTC).replace(tzinfo=None)
    keys = max(args.size // 10, 1000)  # idempotency-keys' backlog: background, no method runs on it
    template = build_template(args.admin_url, layout, args.size, args.live, args.revoked, now, idempotency_keys=keys)
    methods: list[tuple[str, Method | None]] = [
        ("baseline", None),
        ("floor", lambda url: floor(url, now)),
        ("single transaction", lambda url: tool(url, now, None, strict=False)),
        (f"batched {args.batch_size:,}", lambda url: tool(url, now, args.batch_size, strict=False)),
    ]
    windows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        for rate in args.rates:
            for _rep, (label, method) in itertools.product(range(args.reps), methods):
                seconds = args.seconds / 2 if method is None else args.seconds
                window = coexist_window(args, template, rate, label, method, seconds, now)
                windows.append(window)
                save(args.results_dir, "coexist", windows)
                problems += coexist_problems(window)
                deletion = window.get("deletion") or {}
                deleted = f"; deleted {deletion.get('rows')} in {deletion.get('statement_s') or 0:.2f} s"
                log(
                    f"{rate} {label}: {sum(window['requests'].values()):,} requests, errors {window['errors']}, "
                    f"{window['lock_waits']} lock waits" + (deleted if method else "")
                )
    finally:
        drop(args.admin_url, template)
    print_coexist(windows)
    if problems:
        raise SystemExit("\n".join(["coexist: the deletions were not exact:", *problems]))


def print_coexist(windows: list[dict[str, Any]]) -> None:
    print(
        "| rate | method | window s | app requests | req/s | logout-all/s | errors by SQLSTATE | deadlocks "
        "| app lock-waits | deletion lock-waits | deletion s | rows deleted | due revoked by the app first "
        "| due left (run's count) | run status |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for w in windows:
        requests = sum(w["requests"].values())
        errors = ", ".join(f"{state}: {n}" for state, n in sorted(w["errors"].items())) or "none"
        d, a = w.get("deletion") or {}, w.get("accounting") or {}
        status = d.get("error") or d.get("status") or ("ok" if d else "")
        seconds = f"{d['statement_s']:.2f}" if d.get("statement_s") is not None else ""
        rows = f"{d['rows']:,}" if d.get("rows") is not None else ""
        # The run's own count of what it left (rows the app held) beside what was left after the window.
        left = f"{a['left_due']} ({d.get('remaining') or 0})" if a else ""
        print(
            f"| {w['rate']} | {w['method']} | {w['seconds']:.1f} | {requests:,} | {requests / w['seconds']:.0f} "
            f"| {w['requests'].get('logout-all', 0) / w['seconds']:.1f} | {errors} | {w['deadlocks']} "
            f"| {w['lock_waits']} | {w['deletion_lock_waits']} | {seconds} | {rows} "
            f"| {a.get('due_revoked_by_app', '')} | {left} | {status} |"
        )
    for rate in dict.fromkeys(w["rate"] for w in windows):
        # Each statement's latencies pooled over the repetitions of a method: a p99 of a
        # few hundred requests is its two or three slowest, one stall can make it.
        pooled: dict[str, dict[str, list[float]]] = {}
        for w in windows:
            if w["rate"] == rate:
                for kind, counts in w["latency_counts_ms"].items():
                    values = [float(latency) for latency, n in counts.items() for _ in range(n)]
                    pooled.setdefault(w["method"], {}).setdefault(kind, []).extend(values)
        reps = Counter(w["method"] for w in windows if w["rate"] == rate)
        print()
        print(
            f"{rate}: per statement (requests of the fewest-sampled method), p50 / p99 ms (p99 × the baseline's), "
            f"pooled over {max(reps.values())} windows"
        )
        print()
        print("| statement | " + " | ".join(pooled) + " |")
        print("|---|" + "---|" * len(pooled))
        for kind in APP_SQL:
            cells = []
            base = pooled["baseline"][kind]
            for method, latencies in pooled.items():
                values = latencies[kind]
                if not values:
                    cells.append("–")
                    continue
                cell = f"{percentile(values, 50):.1f} / {percentile(values, 99):.1f}"
                if method != "baseline" and base:
                    cell += f" (×{percentile(values, 99) / percentile(base, 99):.1f})"
                cells.append(cell)
            fewest = min(len(latencies[kind]) for latencies in pooled.values())
            print(f"| {kind} ({fewest:,}) | " + " | ".join(cells) + " |")
