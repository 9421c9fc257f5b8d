"""Few round trips to a distant database, counted, not guessed: every command runs through
a TCP proxy that holds each chunk for a while and counts a round trip each time the client
speaks after the server (benchmarks/netpath.py). The targets are issue 23's: a no-op
hourly run, `metrics` and `status` in at most 10 on one connection each, `check` in at
most 30, a batched run in at most 2 per batch plus 12."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from helpers import run_cli, seed_due_and_live

from benchmarks.netpath import Counts, DelayProxy, delayed

# Long enough that a client's pipelined statements all leave before any answer arrives,
# whatever the machine's load; short enough to keep the tests quick.
DELAY_S = 0.05


@pytest.fixture
def remote(postgres) -> Iterator[tuple[DelayProxy, str]]:
    with delayed(postgres.url, DELAY_S) as (proxy, url):
        yield proxy, url


def counted(proxy: DelayProxy, url: str, *args: str) -> tuple[dict, Counts]:
    proxy.reset()
    completed = run_cli(*args, env={"DATABASE_URL": url})
    assert completed.returncode == 0, completed.stderr
    outputs = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    return (outputs[0] if outputs else {}), proxy.counts()


def test_a_no_op_hourly_run_takes_at_most_10_round_trips_on_one_connection(postgres, remote):
    proxy, url = remote
    seed_due_and_live(postgres, due=0, live=50)
    counted(proxy, url, "refresh-tokens", "--json")  # the first run makes the history's tables
    result, counts = counted(proxy, url, "refresh-tokens", "--json")
    assert (result["rows"], result["remaining"]) == (0, 0)
    assert counts.connections == 1 and counts.round_trips <= 10, counts


def test_metrics_and_status_each_take_at_most_10_round_trips_on_one_connection(postgres, remote):
    proxy, url = remote
    seed_due_and_live(postgres, due=30, live=50)
    counted(proxy, url, "metrics", "--json")
    snapshot, metrics = counted(proxy, url, "metrics", "--json")
    assert next(task for task in snapshot["tasks"] if task["name"] == "refresh-tokens")["due_rows"] == 30
    assert metrics.connections == 1 and metrics.round_trips <= 10, metrics
    _status, status = counted(proxy, url, "status", "--json")
    assert status.connections == 1 and status.round_trips <= 10, status


def test_check_takes_at_most_30_round_trips(postgres, remote):
    proxy, url = remote
    seed_due_and_live(postgres, due=30, live=50)
    _finding, counts = counted(proxy, url, "check", "--json")
    assert counts.connections == 1 and counts.round_trips <= 30, counts


def test_a_batched_run_takes_at_most_2_round_trips_per_batch_plus_12(postgres, remote):
    proxy, url = remote
    seed_due_and_live(postgres, due=8_000, live=50)
    counted(proxy, url, "idempotency-keys")  # the history's tables, made by a first run
    result, counts = counted(proxy, url, "refresh-tokens", "--batch-size", "500", "--json")
    assert (result["rows"], result["remaining"]) == (8_000, 0)
    assert result["batches"] >= 16
    assert counts.connections == 1 and counts.round_trips <= 2 * result["batches"] + 12, (counts, result["batches"])
