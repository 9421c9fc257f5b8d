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

from collections.abc import Sequence
from dataclasses import dataclass, field

from skybot_cleanup.db.connection import Standby

# The pacer's view of a replay rate is a moving average: this weight on the newest reading.
RATE_WEIGHT = 0.5
# While it waits, the run reads the standbys again this often (each reading is a round trip).
POLL_S = 0.5
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
            track.lag = max(standby.lag_s or 0.0, by_rate, stalled_for)
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
