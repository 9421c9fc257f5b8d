"""One "now" that no clock can push forward (cutoff.py): a run, a dry run, metrics, status
and check take the earlier of this host's clock and the database server's, and say how
far apart they are. The host's clock is moved with libfaketime, as a container or VM
whose NTP failed moves it."""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timedelta

import pytest
from helpers import (
    DAY,
    HOUR,
    MINUTE,
    check_findings,
    env_for,
    events,
    history_rows,
    prom_values,
    put_history,
    run_cli,
    unavailable,
)

from skybot_cleanup.clock import utc_now
from skybot_cleanup.cutoff import RunTime, cutoff, run_time
from skybot_cleanup.demo import idempotency_key_row, refresh_token_row
from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.settings import load


def test_the_runs_now_is_the_earlier_clock_and_the_skew_is_the_hosts_lead():
    server = datetime(2026, 12, 1, 12, 0, 0)
    ahead = run_time(server=server, host=server + HOUR)
    behind = run_time(server=server, host=server - 2 * HOUR)
    assert (ahead.now, ahead.skew_s) == (server, 3600.0)
    assert (behind.now, behind.skew_s) == (server - 2 * HOUR, -7200.0)
    assert RunTime(host=server).now == server and RunTime(host=server).skew_s is None  # SQLite: the host's alone
    settings = load({"database_url": "sqlite:///x.db"}).settings
    revoked = REGISTRY.task("revoked-tokens")
    assert cutoff(revoked, server, settings) == server - timedelta(days=90)


def faked(offset: str) -> list[str]:
    """What runs the console script with this host's clock moved (libfaketime; Debian: faketime)."""
    if shutil.which("faketime") is None:
        unavailable("faketime is not installed (Debian: apt-get install faketime)")
    return ["faketime", "-f", offset]


def seed_around_the_servers_now(postgres) -> dict[str, set[str]]:
    """Rows that expired a minute ago, and rows valid for 30 and 90 more minutes by the
    server's clock (which this host shares): an hour ahead, the host thinks them expired."""
    now = utc_now()
    postgres.insert(
        "RefreshToken",
        [
            refresh_token_row("rt_expired", now - MINUTE),
            refresh_token_row("rt_valid_30m", now + 30 * MINUTE),
            refresh_token_row("rt_valid_90m", now + 90 * MINUTE),
        ],
    )
    postgres.insert(
        "IdempotencyKey",
        [idempotency_key_row("ik_expired", now - MINUTE), idempotency_key_row("ik_valid_30m", now + 30 * MINUTE)],
    )
    return {"RefreshToken": {"rt_valid_30m", "rt_valid_90m"}, "IdempotencyKey": {"ik_valid_30m"}}


@pytest.mark.parametrize("mode", [[], ["--batch-size", "1"]], ids=["default", "batches"])
def test_a_host_clock_an_hour_ahead_deletes_no_row_still_valid_by_the_servers(postgres, tmp_path, mode):
    valid = seed_around_the_servers_now(postgres)
    env = env_for(postgres, prom_file=tmp_path)
    for task in ("refresh-tokens", "idempotency-keys"):
        completed = run_cli(task, "--json", *mode, env=env, via=faked("+1h"))
        assert completed.returncode == 0, completed.stderr
        result = json.loads(completed.stdout)
        assert result["rows"] == 1
        assert result["clock_skew_s"] == pytest.approx(3600, abs=5)
        skew = next(event for event in events(completed.stderr) if event["event"] == "clock_skew")
        host, server = (datetime.fromisoformat(skew[name].rstrip("Z")) for name in ("host_clock", "server_clock"))
        assert host - server == pytest.approx(timedelta(hours=1), abs=timedelta(seconds=5))
        # The cutoff is the server's now, not the host's.
        assert abs(datetime.fromisoformat(result["cutoff"].rstrip("Z")) - server) < timedelta(seconds=5)
    assert postgres.ids("RefreshToken") == valid["RefreshToken"]
    assert postgres.ids("IdempotencyKey") == valid["IdempotencyKey"]
    recorded = {row["task"]: row["clock_skew_s"] for row in history_rows(postgres)}
    assert recorded["refresh-tokens"] == pytest.approx(3600, abs=5)
    assert prom_values(tmp_path / "skybot_cleanup_refresh-tokens.prom")[
        "skybot_cleanup_clock_skew_seconds"
    ] == pytest.approx(3600, abs=5)


def test_a_host_clock_two_hours_behind_is_the_earlier_one_and_warned_of(postgres):
    now = utc_now()
    postgres.insert(
        "RefreshToken",
        [refresh_token_row("rt_expired_3h", now - 3 * HOUR), refresh_token_row("rt_expired_1h", now - HOUR)],
    )
    completed = run_cli("refresh-tokens", "--json", env=env_for(postgres), via=faked("-2h"))
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["rows"]) == (0, 1)
    assert result["clock_skew_s"] == pytest.approx(-7200, abs=5)
    assert "clock_skew" in [event["event"] for event in events(completed.stderr)]
    assert postgres.ids("RefreshToken") == {"rt_expired_1h"}  # due by the server, not yet by this host


def test_dry_runs_metrics_status_and_check_judge_by_the_same_now(postgres):
    seed_around_the_servers_now(postgres)
    env = env_for(postgres)
    dry = run_cli("refresh-tokens", "--dry-run", "--json", env=env, via=faked("+1h"))
    assert json.loads(dry.stdout)["rows"] == 1
    metrics = run_cli("metrics", "--json", env=env, via=faked("+1h"))
    due = {task["name"]: task["due_rows"] for task in json.loads(metrics.stdout)["tasks"]}
    assert (due["refresh-tokens"], due["idempotency-keys"]) == (1, 1)
    status = run_cli("status", "--json", env=env, via=faked("+1h"))
    assert {row["task"]: row["due_rows"] for row in map(json.loads, status.stdout.splitlines())}["refresh-tokens"] == 1
    check = run_cli("check", "--json", env=env, via=faked("+1h"))
    findings = check_findings(check)
    clock = next(message for level, message in findings if "clock" in message)
    assert ("warning", clock) in findings and "ahead of the server's" in clock and "3,600" not in clock
    assert "refresh-tokens: 1 rows due" in [message for _level, message in findings]


def test_check_says_the_clocks_agree_when_they_do(postgres):
    findings = check_findings(run_cli("check", "--json", env=env_for(postgres)))
    assert any(level == "ok" and message.startswith("clocks agree") for level, message in findings)


def test_the_skew_threshold_is_a_setting(postgres):
    seed_around_the_servers_now(postgres)
    completed = run_cli("refresh-tokens", env=env_for(postgres, clock_skew_warning_s=7200), via=faked("+1h"))
    assert completed.returncode == 0
    assert "clock_skew" not in [event["event"] for event in events(completed.stderr)]


def test_the_history_is_stamped_and_pruned_by_the_servers_clock_whatever_the_hosts(postgres, tmp_path):
    """A host 40 days ahead used to prune the whole history (31 of 31 rows), and its row,
    dated 40 days ahead, kept magic-links OK through later failures. Every record is now
    on the server's clock: nothing is pruned before its time, nothing dated in the future."""
    put_history(postgres, *[("magic-links", "ok", days * DAY) for days in range(1, 25)])
    env = env_for(postgres, prom_file=tmp_path)
    ahead = run_cli("magic-links", "--json", env=env, via=faked("+40d"))
    assert ahead.returncode == 0, ahead.stderr
    rows = history_rows(postgres)
    assert len([row for row in rows if row["task"] == "magic-links"]) == 25  # nothing pruned
    newest = max(row["finished_at"] for row in rows)
    assert abs(newest - utc_now()) < timedelta(minutes=1)  # the server's now, not 40 days on
    assert abs(datetime.fromisoformat(json.loads(ahead.stdout)["finished_at"].rstrip("Z")) - utc_now()) < MINUTE
    textfile = prom_values(tmp_path / "skybot_cleanup_magic-links.prom")
    assert abs(textfile["skybot_cleanup_last_success_timestamp_seconds"] - time.time()) < 60
    failed = run_cli("magic-links", env={**env, "SKYBOT_CLEANUP_MAGIC_LINK_USED_COLUMN": "nope"})
    assert failed.returncode == 2
    status = {job["task"]: job for job in map(json.loads, run_cli("status", "--json", env=env).stdout.splitlines())}
    assert status["magic-links"]["health"] == "FAILING"


def test_a_host_clock_three_hours_behind_records_and_judges_by_the_servers(postgres, tmp_path):
    """The hourly jobs' last success is the server's time: no alert thinks them overdue."""
    env = env_for(postgres, prom_file=tmp_path)
    behind = run_cli("refresh-tokens", "--json", env=env, via=faked("-3h"))
    assert behind.returncode == 0, behind.stderr
    textfile = prom_values(tmp_path / "skybot_cleanup_refresh-tokens.prom")
    assert abs(textfile["skybot_cleanup_last_success_timestamp_seconds"] - time.time()) < 60
    status = run_cli("status", "--json", env=env, via=faked("-3h"))
    job = next(job for job in map(json.loads, status.stdout.splitlines()) if job["task"] == "refresh-tokens")
    assert job["health"] == "OK"
    assert abs(datetime.fromisoformat(job["last_success_at"].rstrip("Z")) - utc_now()) < MINUTE
