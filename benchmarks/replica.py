"""`replica`: a streaming standby behind a throttled link (benchmarks.standby), and how far
behind each method leaves it.

On fresh copies of --size due rows of the app's "RefreshToken" (beside its live and
revoked rows) on a private primary, each method runs while a sampler reads the standby's
lag every 100 ms, from the method's start until the standby has replayed everything:

- the plain `DELETE` (the floor);
- the tool's batched run with its defaults;
- the tool with `--sleep-ms`, hand-tuned for this link: the pause in which the link carries
  one batch's WAL (from the floor's WAL per row), unless --sleep-ms gives it;
- the tool with `--max-replica-lag 2`, and with `--max-replica-lag 0` (pacing off), once
  the tool has the option (its `--help` lists it); skipped with a message until then.

Per method: the peak lag (three views, see `Lag`), the run's time, its WAL, the link's own
time for that WAL (bytes over the link's rate), how long the standby took to catch up
after the run, and that every due row and nothing else was deleted, on the primary and as
the standby shows it.
"""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from benchmarks.databases import DUE, database_url, drop, fresh_copy, left_due, total_rows, wal_position, wal_since
from benchmarks.measure import fmt, grouped, log, save
from benchmarks.methods import TOOL, Method, first_run, floor, tool
from benchmarks.seeding import EXPIRY_ORDER, build_template
from benchmarks.standby import Lag, Pair, StandbyUnavailable, connect, streaming_standby

SIZE = 500_000
TARGET_LAG_S = 2
FLOOR = "plain DELETE"
DEFAULTS = "tool, defaults"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate-mbit", type=float, default=100, help="the link's rate (default 100 Mbit/s)")
    parser.add_argument(
        "--sleep-ms", type=int, help="the hand-tuned pause (default: one batch's WAL over the link, from the floor's)"
    )
    parser.add_argument("--sample-ms", type=float, default=100, help="how often the lag is read (default 100 ms)")


def has_option(option: str) -> bool:
    """Whether the installed tool's refresh-tokens knows `option` (its --help lists it)."""
    completed = subprocess.run([str(TOOL), "refresh-tokens", "--help"], capture_output=True, text=True, check=False)
    return option in completed.stdout


class LagSampler(threading.Thread):
    """The standby's lag every `interval_s`, on connections of their own (unix sockets: not
    through the link)."""

    def __init__(self, pair: Pair, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.pair, self.interval_s = pair, interval_s
        self.stop = threading.Event()
        self.samples: list[Lag] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.pair.primary.url()) as primary, connect(self.pair.standby.url()) as standby:
                while True:
                    self.samples.append(self.pair.lag(primary, standby))
                    if self.stop.wait(self.interval_s):
                        return
        except BaseException as exc:  # reported by the thread that reads the samples
            self.error = exc

    def finish(self) -> list[Lag]:
        self.stop.set()
        self.join()
        if self.error is not None:
            raise RuntimeError(f"the lag sampler failed: {self.error}") from self.error
        return self.samples


def summary(samples: list[Lag], start: int, started: float, ended: float, caught_up: float) -> dict[str, Any]:
    """The peaks of a window that began at WAL position `start` (see Lag.replay_lag_since)."""

    def peak(values: list[float]) -> float:
        return max(values, default=0.0)

    return {
        "peak_replay_lag_s": peak([s.replay_lag_since(start) for s in samples]),
        "peak_byte_lag": int(peak([float(s.byte_lag) for s in samples])),
        "peak_staleness_s": peak([s.staleness_s for s in samples]),
        "samples": len(samples),
        "catch_up_s": caught_up - ended,
        "until_caught_up_s": caught_up - started,
        # The lag over time, for a plot: seconds from the start, replay lag, byte lag,
        # staleness; and replay_lag as pg_stat_replication showed it.
        "trace": [
            [
                round(s.at - started, 2),
                round(s.replay_lag_since(start), 3),
                s.byte_lag,
                round(s.staleness_s, 3),
                None if s.replay_lag_s is None else round(s.replay_lag_s, 3),
            ]
            for s in samples
        ],
    }


def measure(
    pair: Pair, template: str, label: str, work: Method, cutoff: datetime, due: int, total: int, sample_s: float
) -> dict[str, Any]:
    """One method on a fresh copy, the standby caught up before it starts; its lag until
    the standby has caught up after it."""
    admin_url = pair.primary_url()
    name = fresh_copy(admin_url, template)
    try:
        url = database_url(admin_url, name)
        sampler = LagSampler(pair, sample_s)
        with connect(admin_url) as conn:
            # A commit the standby replays before the start: its newest replayed commit is
            # then fresh, and the staleness view does not count the idle time before the run.
            conn.execute("SELECT pg_current_xact_id()")
            pair.wait_caught_up()
            start, position = wal_position(conn), pair.position(conn)
            sampler.start()
            started = time.monotonic()
            result = work(url)
            ended = time.monotonic()
            result["wal_bytes"] = wal_since(conn, start)
        pair.wait_caught_up()
        caught_up = time.monotonic()
        samples = sampler.finish()
        standby_url = database_url(pair.standby.url(), name)
        result |= {
            "method": label,
            "run_s": ended - started,
            "link_s": pair.link_seconds(result["wal_bytes"]),
            "left": left_due(url, cutoff),
            "total": total_rows(url),
            "standby_left": left_due(standby_url, cutoff),
            "standby_total": total_rows(standby_url),
            **summary(samples, position, started, ended, caught_up),
        }
    finally:
        drop(admin_url, name)
    problems = [
        f"{label}: {problem}"
        for problem, wrong in (
            (f"deleted {result['rows']} rows, expected {due}", result["rows"] != due),
            (f"left {result['left']} due rows", result["left"] != 0),
            (f"deleted {total - due - result['total']} rows that were not due", result["total"] != total - due),
            (
                "the standby shows other rows than the primary",
                (result["standby_left"], result["standby_total"]) != (result["left"], result["total"]),
            ),
        )
        if wrong
    ]
    if problems:
        raise SystemExit("replica: the deletions were not exact:\n" + "\n".join(problems))
    return result


def hand_tuned_sleep_ms(floor_result: dict[str, Any], batch_size: int, rate_bits: int) -> int:
    """The pause in which the link carries one batch's WAL, at the floor's WAL per row."""
    per_batch = floor_result["wal_bytes"] / max(floor_result["rows"], 1) * batch_size
    return max(10, math.ceil(float(per_batch) * 8 / rate_bits * 100) * 10)  # to 10 ms, up


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end the run through its finally blocks (clusters stopped, the
    namespace and the qdisc removed), as Ctrl-C does."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(f"replica: stopped by signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def run(args: argparse.Namespace) -> None:
    stop_on_signals()
    now = datetime.now(UTC).replace(tzinfo=None)
    due, total = args.size, args.size + args.live + args.revoked
    templates: list[str] = []

    def prepare(primary_url: str) -> None:
        templates.append(build_template(primary_url, EXPIRY_ORDER, due, args.live, args.revoked, now))
        first_run(database_url(primary_url, templates[0]))

    paced = has_option("--max-replica-lag")
    if not paced:
        log(
            "skipping --max-replica-lag: the installed skybot-cleanup does not have it yet "
            "(refresh-tokens --help does not list it)"
        )
    results: list[dict[str, Any]] = []
    sleep_ms: int | None = args.sleep_ms
    try:
        with streaming_standby(args.rate_mbit, prepare=prepare) as pair:
            for _rep in range(args.reps):
                methods: list[tuple[str, Method]] = [
                    (FLOOR, lambda url: floor(url, now, DUE)),
                    (DEFAULTS, lambda url: tool(url, now, args.batch_size, keep_output=True)),
                ]
                for label, work in methods:
                    results.append(measure(pair, templates[0], label, work, now, due, total, args.sample_ms / 1000))
                    report(results[-1])
                if sleep_ms is None:
                    sleep_ms = hand_tuned_sleep_ms(results[0], args.batch_size, pair.rate_bits)
                    log(f"--sleep-ms {sleep_ms}: one batch's WAL over the link, at the plain DELETE's WAL per row")
                paced_methods = [(f"tool, --sleep-ms {sleep_ms}", ["--sleep-ms", str(sleep_ms)])]
                if paced:
                    paced_methods += [
                        (f"tool, --max-replica-lag {TARGET_LAG_S}", ["--max-replica-lag", str(TARGET_LAG_S)]),
                        ("tool, --max-replica-lag 0 (off)", ["--max-replica-lag", "0"]),
                    ]
                for label, options in paced_methods:
                    work = pacing(now, args.batch_size, options, label)
                    results.append(measure(pair, templates[0], label, work, now, due, total, args.sample_ms / 1000))
                    report(results[-1])
    except StandbyUnavailable as exc:
        raise SystemExit(f"replica: {exc}") from None
    meta = {
        "due": due,
        "live": args.live,
        "revoked": args.revoked,
        "rate_mbit": args.rate_mbit,
        "sleep_ms": sleep_ms,
        "sample_ms": args.sample_ms,
        "max_replica_lag": "measured" if paced else "skipped: the tool has no --max-replica-lag yet",
    }
    save(args.results_dir, "replica", results, **meta)
    print_replica(results)
    if not paced:
        print()
        print("--max-replica-lag: not measured, the installed tool does not have the option yet.")


def pacing(now: datetime, batch_size: int, options: list[str], label: str) -> Method:
    return lambda url: tool(url, now, batch_size, options=options, label=label, keep_output=True)


def report(result: dict[str, Any]) -> None:
    log(
        f"{result['method']}: {result['run_s']:.1f} s, {result['wal_bytes'] / 1e6:.0f} MB of WAL "
        f"(link {result['link_s']:.1f} s), peak replay lag {result['peak_replay_lag_s']:.1f} s, "
        f"caught up {result['catch_up_s']:.1f} s after"
    )


def print_replica(results: list[dict[str, Any]]) -> None:
    print(
        "| method | run s | WAL MB | link s (WAL / rate) | run ÷ link | peak replay lag s | peak byte lag MB "
        "| peak standby staleness s | caught up s after the run | batches | rows deleted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method, runs in grouped(results, "method").items():

        def column(key: str, scale: float = 1, digits: int = 1, runs: list[dict[str, Any]] = runs) -> str:
            return fmt([r[key] * scale for r in runs], digits)

        batches = [r["batches"] for r in runs if r.get("batches") is not None]
        ratio = [r["run_s"] / r["link_s"] for r in runs if r["link_s"]]
        print(
            f"| {method} | {column('run_s')} | {column('wal_bytes', 1e-6, 0)} | {column('link_s')} "
            f"| {fmt(ratio, 2) if ratio else ''} | {column('peak_replay_lag_s')} | {column('peak_byte_lag', 1e-6, 0)} "
            f"| {column('peak_staleness_s')} | {column('catch_up_s')} | {fmt(batches, 0) if batches else ''} "
            f"| {runs[0]['rows']:,} |"
        )
