"""Replica-aware pacing: a batched run keeps every streaming standby's replay lag under a
target, moving at about the speed the slowest standby replays, not stopping and
starting.

Between batches the run reads, in the message that commits a batch, each physical
standby's replay position and lag from pg_stat_replication (db.connection). From two
readings a standby was busy for throughout, the pacer learns how fast it replays; a
standby's lag is then the largest of what it reports, what it has yet to replay at that
speed, and how long it has replayed nothing while behind. The run waits while the worst
lag is above half the target: the standby is never idle (the run goes at its speed) and
its lag stays between half the target and half the target plus one batch's worth. A lag
reported above the target always stops the run until it falls, whatever the estimate
says. Peers: pt-archiver's --check-slave-lag/--max-lag and gh-ost's --max-lag-millis, a
throttle as a control loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from skybot_cleanup.db.connection import RunConnection, Standby
from skybot_cleanup.vocabulary import StopReason

# The pacer's view of a replay rate is a moving average: this weight on the newest reading.
RATE_WEIGHT = 0.5
# While it waits, the run reads the standbys again this often (each reading is a round trip).
POLL_S = 0.5
# While waiting for the standbys, a line in the log this often.
WAIT_LOG_INTERVAL_S = 30.0
STANDBYS_INVISIBLE = (
    "this role cannot read the streaming standbys' replay positions, so the run cannot keep their lag under "
    "SKYBOT_CLEANUP_MAX_REPLICA_LAG_S"
)
# A standby that has replayed nothing for this long while behind has stalled: the run ends
# (stopped_by replica_lag) instead of holding its lock for ever.
STALL_S = 300.0


@dataclass
class _Track:
    at: float
    replayed: int
    behind: int
    rate: float | None = None  # bytes replayed per second, while busy
    progressed_at: float = 0.0
    lag: float = 0.0  # seconds: the larger of the reported lag and what is left at `rate`


@dataclass
class ReplicaPacer:
    target_s: float
    tracks: dict[str, _Track] = field(default_factory=dict)
    waited_s: float = 0.0
    invisible: bool = False  # standbys exist, but this role cannot see their positions

    def observe(self, at: float, standbys: Sequence[Standby]) -> None:
        """A reading of every standby at monotonic time `at`."""
        self.invisible = bool(standbys) and not any(standby.visible for standby in standbys)
        seen = {}
        for standby in standbys:
            if standby.replayed is None or standby.behind is None:
                continue
            track = self.tracks.get(standby.name)
            if track is None:
                track = _Track(at, standby.replayed, standby.behind, progressed_at=at)
            else:
                elapsed = at - track.at
                moved = standby.replayed - track.replayed
                # Busy throughout (behind at both readings): what it replayed is its speed.
                if elapsed > 0 and moved > 0 and track.behind > 0 and standby.behind > 0:
                    sample = moved / elapsed
                    track.rate = sample if track.rate is None else RATE_WEIGHT * sample + (1 - RATE_WEIGHT) * track.rate
                if moved > 0 or standby.behind == 0:
                    track.progressed_at = at
                track.at, track.replayed, track.behind = at, standby.replayed, standby.behind
            # A standby that has not moved since it last did, with WAL to replay, is at least
            # that far behind (its own replay_lag stays where it was while it replays nothing).
            stalled_for = at - track.progressed_at if standby.behind > 0 else 0.0
            by_rate = standby.behind / track.rate if track.rate else 0.0
            # Nothing left to replay is no lag, whatever replay_lag still shows: it keeps its
            # last measure after the standby has caught up, until the next WAL arrives.
            reported = (standby.lag_s or 0.0) if standby.behind > 0 else 0.0
            track.lag = max(reported, by_rate, stalled_for)
            seen[standby.name] = track
        self.tracks = seen

    def lag_s(self) -> float:
        """The worst standby's lag as last estimated."""
        return max((track.lag for track in self.tracks.values()), default=0.0)

    def pause_s(self) -> float:
        """How long to wait before the next batch: until the worst lag is back to half the
        target (0: go on). The caller reads the standbys again at least every POLL_S."""
        lag = self.lag_s()
        if lag <= self.target_s / 2:
            return 0.0
        return lag - self.target_s / 2

    def stalled(self, at: float) -> bool:
        """A standby behind the target has replayed nothing for STALL_S."""
        return any(track.lag > self.target_s and at - track.progressed_at >= STALL_S for track in self.tracks.values())


class Pace:
    """What a batched run does between two batches: wait as long as the standbys need to
    come back within half the lag target (reading them every POLL_S), and --sleep-ms (the
    time already waited counts toward it). `out_of_time(after_s)` says whether a pause
    that long would pass --max-runtime: the waiting counts against it."""

    def __init__(self, sleep_ms: int, max_lag_s: float, out_of_time: Callable[[float], bool], log: Any):
        self.sleep_s = sleep_ms / 1000
        self.pacer = ReplicaPacer(max_lag_s) if max_lag_s else None
        self.out_of_time = out_of_time
        self.log = log
        self.waited_s = 0.0  # waiting for the standbys (the result's replica_wait_s)
        self.warnings: list[str] = []

    def between_batches(self, run: RunConnection) -> StopReason | None:
        """The pause after a batch has committed, or why the run must stop instead."""
        began = time.monotonic()
        if self.pacer is not None:
            stop = self._wait_for_standbys(run, self.pacer)
            if stop is not None:
                return stop
        rest = self.sleep_s - (time.monotonic() - began)
        if rest > 0:
            if self.out_of_time(rest):  # do not sleep past the cap
                return StopReason.MAX_RUNTIME
            time.sleep(rest)
        return None

    def _wait_for_standbys(self, run: RunConnection, pacer: ReplicaPacer) -> StopReason | None:
        pacer.observe(run.read_at, run.standbys)
        if pacer.invisible and STANDBYS_INVISIBLE not in self.warnings:
            self.warnings.append(STANDBYS_INVISIBLE)
            self.log.warning(
                "replica_lag_unknown",
                hint=f"{STANDBYS_INVISIBLE}; `skybot-cleanup check` prints the GRANT (pg_read_all_stats)",
            )
        began = logged = time.monotonic()
        waited = False
        try:
            while (wait := pacer.pause_s()) > 0:
                step = min(wait, POLL_S)
                if self.out_of_time(step):
                    return StopReason.MAX_RUNTIME
                waited = True
                time.sleep(step)
                run.read_standbys()
                pacer.observe(run.read_at, run.standbys)
                if pacer.stalled(run.read_at):
                    self.log.warning("replica_stalled", lag_s=round(pacer.lag_s(), 3), standbys=list(pacer.tracks))
                    return StopReason.REPLICA_LAG
                if time.monotonic() - logged >= WAIT_LOG_INTERVAL_S:
                    logged = time.monotonic()
                    self.log.info("waiting_for_standbys", lag_s=round(pacer.lag_s(), 3), target_s=pacer.target_s)
            return None
        finally:
            if waited:
                self.waited_s += time.monotonic() - began
