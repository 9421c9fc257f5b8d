"""The pacer's judgement, reading by reading (the real standby is in test_replicas.py)."""

from __future__ import annotations

import pytest

from skybot_cleanup.db import Standby
from skybot_cleanup.pacing import ReplicaPacer


def reading(replayed: int, behind: int, lag_s: float | None = None) -> list[Standby]:
    return [Standby("standby@10.0.0.2#1", replayed, behind, lag_s)]


def test_a_standby_that_has_caught_up_has_no_lag_whatever_replay_lag_still_shows():
    pacer = ReplicaPacer(target_s=2)
    pacer.observe(0.0, reading(1_000, 0, lag_s=7.0))  # replay_lag keeps its last measure
    assert (pacer.lag_s(), pacer.pause_s()) == (0.0, 0.0)


def test_the_replay_speed_learned_while_busy_paces_the_run_to_half_the_target():
    pacer = ReplicaPacer(target_s=2)
    pacer.observe(0.0, reading(0, 4_000_000))
    pacer.observe(1.0, reading(1_000_000, 6_000_000))  # 1 MB/s, busy throughout
    assert pacer.lag_s() == pytest.approx(6.0)
    assert pacer.pause_s() == pytest.approx(5.0)  # back to half the target: 1 s of backlog


def test_a_standby_that_replays_nothing_is_at_least_as_far_behind_as_it_has_been_stuck():
    pacer = ReplicaPacer(target_s=1)
    pacer.observe(0.0, reading(500, 10_000, lag_s=0.02))  # replay_lag stays put while paused
    pacer.observe(0.8, reading(500, 20_000, lag_s=0.02))
    assert pacer.lag_s() == pytest.approx(0.8) and pacer.pause_s() > 0
    assert not pacer.stalled(0.8)
    pacer.observe(400.0, reading(500, 30_000, lag_s=0.02))  # five minutes and more without replaying
    assert pacer.stalled(400.0)


def test_a_role_that_cannot_see_the_positions_makes_the_pacer_blind_not_stuck():
    pacer = ReplicaPacer(target_s=2)
    pacer.observe(0.0, [Standby("standby", None, None, None)])
    assert pacer.invisible and pacer.pause_s() == 0.0
