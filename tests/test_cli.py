"""The command line itself: help, version, output forms, exit codes, `all`."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import CONSOLE_SCRIPT, TASK_NAMES, events, invoke, run_cli, seed_tokens
from typer.testing import CliRunner

from skybot_cleanup import __version__
from skybot_cleanup.cli import app


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--max-rows", "-1"], ["--sleep-ms", "x"]])
def test_invalid_batch_options_are_usage_errors(args):
    completed = run_cli("refresh-tokens", *args, env={"DATABASE_URL": "sqlite:///x.db"})
    assert completed.returncode == 2
    assert "Invalid value" in completed.stderr and "Traceback" not in completed.stderr


def test_version():
    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"skybot-cleanup {__version__}\n")


def test_python_dash_m_works():
    completed = subprocess.run(
        [str(CONSOLE_SCRIPT.with_name("python")), "-m", "skybot_cleanup", "--version"], capture_output=True, text=True
    )
    assert (completed.returncode, completed.stdout) == (0, f"skybot-cleanup {__version__}\n")


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in [*TASK_NAMES, "all", "metrics", "status", "check", "history", "config", "schedule", "demo"]:
        assert name in result.stdout


def test_task_help_gives_schedule_rule_variables_and_exit_codes_and_no_value_metavars():
    result = CliRunner().invoke(app, ["revoked-tokens", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    text = " ".join(result.stdout.split())
    assert "daily at 03:00 UTC (cron 0 3 * * *)" in text
    assert '"RefreshToken" rows with "revokedAt" < now - retention' in text
    assert "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS (default 90 days)" in text
    assert "SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN" in text
    assert "75 skipped" in text and "2 usage or configuration error" in text
    assert "<bool>" not in result.stdout


def test_unknown_subcommand_is_a_usage_error():
    result = invoke("refresh-token")
    assert result.exit_code == 2
    assert "No such command 'refresh-token'" in result.stderr


def test_json_output_and_run_log(backend):
    seed_tokens(backend)
    result = invoke("refresh-tokens", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0
    (line,) = result.stdout.splitlines()
    output = json.loads(line)
    assert {k: output[k] for k in ("task", "status", "dry_run", "rows", "exit_code")} == {
        "task": "refresh-tokens",
        "status": "ok",
        "dry_run": False,
        "rows": 2,
        "exit_code": 0,
    }
    assert output["cutoff"].endswith("Z") and isinstance(output["duration_ms"], int)
    # The tests connect as a superuser: more than a cleanup needs, which the run says once.
    assert [event["event"] for event in events(result.stderr)] == (
        ["privileges_beyond_need", "run_finished"] if backend.kind == "postgres" else ["run_finished"]
    )
    (event,) = events(result.stderr, "run_finished")
    for key in ("task", "status", "rows", "dry_run", "cutoff", "duration_ms", "run_id"):
        assert event[key] == output[key], key
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}


def test_human_summary_dry_run_and_quiet(backend):
    seed_tokens(backend)
    result = invoke("refresh-tokens", "--dry-run", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0
    assert result.stdout.startswith("refresh-tokens: would delete 2 rows (cutoff ")
    assert backend.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}
    quiet = invoke("refresh-tokens", "--quiet", env={"DATABASE_URL": backend.url})
    assert (quiet.exit_code, quiet.stdout) == (0, "")
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}


def test_all_runs_every_task_in_order(backend):
    seed_tokens(backend)
    result = invoke("all", "--json", env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    expected = {name: 0 for name in TASK_NAMES} | {"refresh-tokens": 2}
    assert [(o["task"], o["rows"]) for o in outputs] == list(expected.items())
    assert len({o["run_id"] for o in outputs}) == len(TASK_NAMES)


def test_all_exits_non_zero_when_one_task_fails(backend):
    seed_tokens(backend)
    result = invoke("all", "--json", env={"DATABASE_URL": backend.url, "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "MagicLinks"})
    assert result.exit_code == 2
    outputs = {json.loads(line)["task"]: json.loads(line)["status"] for line in result.stdout.splitlines()}
    assert outputs == {name: "ok" for name in TASK_NAMES} | {"magic-links": "failed"}
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}


def test_no_command_leaves_state_to_the_next_in_the_same_process(sqlite):
    """Secrets to redact, warnings given once, the log format, a noted signal: each
    command of a process (the tests' runner, a library user) starts afresh."""
    from skybot_cleanup import errors

    key = "abcdefgh12345678"
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": f"ftp://hc-ping.example/{key}"}
    first = invoke("config", env=env)
    assert first.exit_code == 0 and key not in first.stdout
    assert key in errors._known_secrets
    second = invoke("refresh-tokens", "--dry-run", env={"DATABASE_URL": sqlite.url})
    assert second.exit_code == 0
    assert key not in errors._known_secrets  # would have redacted it from this command's text
