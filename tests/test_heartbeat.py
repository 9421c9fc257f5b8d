"""Heartbeat pings: start and exit code, never a reason for a run to fail or wait (heartbeat.py)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from helpers import events, run_cli, seed_operator_data


def test_a_dry_run_does_not_ping(sqlite, monitor):
    seed_operator_data(sqlite)
    url = f"http://127.0.0.1:{monitor.server_port}/{{task}}"
    completed = run_cli("all", "--dry-run", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": url})
    assert completed.returncode == 0, completed.stderr
    assert monitor.requests == []


def test_heartbeat_pings_start_and_exit_code(sqlite, monitor):
    seed_operator_data(sqlite)
    url = f"http://127.0.0.1:{monitor.server_port}/ping/{{task}}"
    completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": url})
    assert completed.returncode == 0, completed.stderr
    run_id = json.loads(completed.stdout)["run_id"]
    uuid.UUID(run_id)  # healthchecks.io wants a UUID for rid
    (start, end) = monitor.requests
    assert start == ("GET", f"/ping/refresh-tokens/start?rid={run_id}", "")
    assert end[:2] == ("POST", f"/ping/refresh-tokens/0?rid={run_id}")
    assert end[2].startswith("task=refresh-tokens status=ok rows=2 duration_ms=")


def test_heartbeat_reports_the_failure_exit_code(sqlite, monitor):
    url = f"http://127.0.0.1:{monitor.server_port}/{{task}}"
    completed = run_cli(
        "magic-links",
        env={
            "DATABASE_URL": sqlite.url,
            "SKYBOT_CLEANUP_PING_URL": url,
            "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "MagicLinks",
        },
    )
    assert completed.returncode == 2
    assert [request[1].split("?")[0] for request in monitor.requests] == ["/magic-links/start", "/magic-links/2"]


@pytest.mark.parametrize(
    "ping_url",
    [
        "http://127.0.0.1:1/secret-key-uuid",
        "hc-ping.com/secret-key-uuid/{task}",
        "https://hc-ping.com/secret-key-uuid /{task}",
        "https://:80:80/secret-key-uuid",
    ],
)
def test_a_bad_or_dead_ping_url_never_fails_the_cleanup_nor_shows_its_key(sqlite, ping_url):
    seed_operator_data(sqlite)
    started = time.monotonic()
    completed = run_cli("all", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": ping_url})
    assert completed.returncode == 0, completed.stderr
    assert time.monotonic() - started < 15
    warnings = [e for e in events(completed.stderr) if e["event"] in ("ping_failed", "ping_url_invalid")]
    assert warnings
    assert "secret-key-uuid" not in completed.stderr + completed.stdout
    if not ping_url.startswith("http://127"):
        assert [e["event"] for e in warnings] == ["ping_url_invalid"]  # once, not once per task
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live"}
