"""Heartbeat pings: start and exit code, never a reason for a run to fail or wait (heartbeat.py)."""

from __future__ import annotations

import json
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
    completed = run_cli("all", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": ping_url})
    assert completed.returncode == 0, completed.stderr
    warnings = [e for e in events(completed.stderr) if e["event"] in ("ping_failed", "ping_url_invalid")]
    assert warnings
    assert "secret-key-uuid" not in completed.stderr + completed.stdout
    if not ping_url.startswith("http://127"):
        assert [e["event"] for e in warnings] == ["ping_url_invalid"]  # once, not once per task
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live"}


def drip(handler):
    """A monitor that answers one byte every half second: a socket timeout never fires."""
    handler.send_response(200)
    handler.send_header("Content-Length", "10000")
    handler.end_headers()
    while not handler.server.released.wait(0.5):
        handler.wfile.write(b"O")
        handler.wfile.flush()


def flood(handler):
    """A monitor whose reply never ends (once, 200 MB were read into memory)."""
    handler.send_response(200)
    handler.end_headers()
    chunk = b"x" * 65536
    while handler.server.sent < 1 << 30 and not handler.server.released.is_set():
        handler.wfile.write(chunk)
        handler.server.sent += len(chunk)


def test_a_slow_drip_monitor_holds_each_ping_to_its_deadline(sqlite, monitor):
    seed_operator_data(sqlite)
    monitor.reply = drip
    completed = run_cli(
        "refresh-tokens",
        env={
            "DATABASE_URL": sqlite.url,
            "SKYBOT_CLEANUP_PING_URL": f"http://127.0.0.1:{monitor.server_port}/{{task}}",
            "SKYBOT_CLEANUP_PING_TIMEOUT_S": "1",
        },
    )
    assert completed.returncode == 0, completed.stderr
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live", "revoked_100d"}
    # One deadline per ping, its retry included: the first attempt spends it all.
    failed = [
        (e["suffix"], e["attempt"], e["error_class"], e["error"]) for e in events(completed.stderr, "ping_failed")
    ]
    assert failed == [
        ("start", 1, "TimeoutError", "no complete reply within 1.0 s"),
        ("0", 1, "TimeoutError", "no complete reply within 1.0 s"),
    ]


def test_an_endless_monitor_reply_is_read_only_a_few_kib(sqlite, monitor):
    seed_operator_data(sqlite)
    monitor.reply = flood
    completed = run_cli(
        "refresh-tokens",
        env={
            "DATABASE_URL": sqlite.url,
            "SKYBOT_CLEANUP_PING_URL": f"http://127.0.0.1:{monitor.server_port}/{{task}}",
        },
    )
    assert completed.returncode == 0, completed.stderr
    assert events(completed.stderr, "ping_failed") == []
    assert monitor.hung_up.wait(30), "the tool kept reading the reply"
    # What the kernel's socket buffers took before the tool hung up, not the 1 GiB offered.
    assert monitor.sent < 64 << 20
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live", "revoked_100d"}


def test_a_malformed_ping_url_is_a_warning_for_runs_and_an_error_for_check_and_config(sqlite):
    """An unbalanced [ once crashed every command before anything was deleted or recorded."""
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": "http://[::1/secret-key-uuid/{task}"}
    run = run_cli("all", env=env)
    assert run.returncode == 0, run.stderr
    assert [e["error"] for e in events(run.stderr, "ping_url_invalid")] == [
        "SKYBOT_CLEANUP_PING_URL is unusable: it is not a valid URL"
    ]
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live"}
    check = run_cli("check", "--json", env=env)
    assert check.returncode == 1
    findings = [json.loads(line) for line in check.stdout.splitlines()]
    assert [(f["level"], f["message"]) for f in findings if "PING_URL" in f["message"]] == [
        ("error", "SKYBOT_CLEANUP_PING_URL is unusable: it is not a valid URL; no heartbeat is sent")
    ]
    config = run_cli("config", "--json", env=env)
    assert config.returncode == 0, config.stderr
    entry = next(e for e in json.loads(config.stdout)["settings"] if e["variable"] == "SKYBOT_CLEANUP_PING_URL")
    assert (entry["value"], entry["error"]) == ("***", "unusable: it is not a valid URL")
    for completed in (run, check, config):
        assert "secret-key-uuid" not in completed.stdout + completed.stderr


def redirect_to(location: str):
    def reply(handler):
        if handler.path.startswith("/moved/"):
            handler.send_response(200)
        else:
            handler.send_response(302)
            handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return reply


@pytest.mark.parametrize("target", ["ftp://127.0.0.1:1/skybot", "file:///etc/passwd"])
def test_a_ping_redirected_away_from_http_is_not_followed_and_is_a_warning(sqlite, monitor, target):
    """urllib follows a redirect to ftp:// by itself; a monitor (or whoever answers for
    it) must not send the tool anywhere but to another http(s) URL."""
    seed_operator_data(sqlite)
    monitor.reply = redirect_to(target)
    completed = run_cli(
        "refresh-tokens",
        env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": f"http://127.0.0.1:{monitor.server_port}/{{task}}"},
    )
    assert completed.returncode == 0, completed.stderr
    scheme = target.partition(":")[0]
    failed = [
        (e["suffix"], e["attempt"], e["error_class"], e["error"]) for e in events(completed.stderr, "ping_failed")
    ]
    refused = f"redirected to {scheme}://, which is not followed (only http:// and https:// are)"
    # Refused once per ping: a retry would be sent to the same place.
    assert failed == [("start", 1, "RedirectRefused", refused), ("0", 1, "RedirectRefused", refused)]
    assert [request[1].split("?")[0] for request in monitor.requests] == ["/refresh-tokens/start", "/refresh-tokens/0"]


def test_a_ping_redirected_to_http_is_followed_within_its_deadline(sqlite, monitor):
    seed_operator_data(sqlite)
    monitor.reply = redirect_to(f"http://127.0.0.1:{monitor.server_port}/moved/here")
    completed = run_cli(
        "refresh-tokens",
        env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": f"http://127.0.0.1:{monitor.server_port}/{{task}}"},
    )
    assert completed.returncode == 0, completed.stderr
    assert events(completed.stderr, "ping_failed") == []
    assert [(method, path.split("?")[0]) for method, path, _ in monitor.requests] == [
        ("GET", "/refresh-tokens/start"),
        ("GET", "/moved/here"),
        ("POST", "/refresh-tokens/0"),
        ("GET", "/moved/here"),  # urllib turns a redirected POST into a GET, as browsers do
    ]
