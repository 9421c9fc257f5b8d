"""Logs (logs.py): every event redacted whoever logs it, and each line's syslog priority
in front of it only where journald or `logger --prio-prefix` reads it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from helpers import CONSOLE_SCRIPT, PASSWORD

from skybot_cleanup import errors, logs


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """Each test configures its own logging; the next one starts from nothing."""
    yield
    logs.reset()
    structlog.reset_defaults()


def test_every_event_is_redacted_whoever_logs_it(capsys):
    """An event that reaches the logger raw (no caller redacted it first): a URL's
    password, a secret the process knows, a control character. Only the chain's own
    redaction stands between them and the log."""
    errors.remember_secrets([PASSWORD])
    try:
        logs.configure_logging("json", syslog_prefix="off")
        logs.get_logger().warning(
            "library_log",
            message=f"could not connect to postgresql://app:{PASSWORD}@db.internal/app",
            detail=f"token {PASSWORD} refused",
            name="line\nbreak\x1b[31m",
        )
    finally:
        errors._known_secrets.discard(PASSWORD)
    (line,) = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert PASSWORD not in line
    assert event["message"] == "could not connect to postgresql://app:***@db.internal/app"
    assert event["detail"] == "token *** refused"
    assert event["name"] == "line\\x0abreak\\x1b[31m"


def test_prefixed_lines_carry_each_events_syslog_priority(capsys):
    logs.configure_logging("json", level="debug", syslog_prefix="on")
    log = logs.get_logger()
    log.debug("a")
    log.info("b")
    log.warning("c")
    log.error("d")
    log.critical("e")
    lines = capsys.readouterr().err.splitlines()
    assert [(line[:3], json.loads(line[3:])["event"]) for line in lines] == [
        ("<7>", "a"),
        ("<6>", "b"),
        ("<4>", "c"),
        ("<3>", "d"),
        ("<2>", "e"),
    ]


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_without_prefixes_nothing_comes_before_the_event(capsys, log_format):
    logs.configure_logging(log_format, syslog_prefix="off")
    logs.get_logger().error("run_failed", error="boom")
    (line,) = capsys.readouterr().err.splitlines()
    if log_format == "json":
        assert json.loads(line)["event"] == "run_failed"
    else:
        assert "run_failed" in line and not line.startswith("<")


def run_with_stderr_in(path: Path, journal_stream: str | None, **env: str) -> list[str]:
    """A failing run with stderr written to `path`, as a service's stderr is the journal."""
    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(path.parent),
        "DATABASE_URL": "sqlite:////nonexistent/app.db",
        "SKYBOT_CLEANUP_STATE_DIR": str(path.parent / "state"),
        "SKYBOT_CLEANUP_LOG_FORMAT": "json",
        **env,
    }
    if journal_stream is not None:
        environment["JOURNAL_STREAM"] = journal_stream
    with path.open("w") as stderr:
        completed = subprocess.run([str(CONSOLE_SCRIPT), "refresh-tokens"], stderr=stderr, env=environment)
    assert completed.returncode == errors.ExitCode.CONFIG
    return path.read_text().splitlines()


def identity(path: Path) -> str:
    status = os.stat(path)
    return f"{status.st_dev}:{status.st_ino}"


def test_the_journal_is_noticed_by_its_stream_not_by_the_variable_alone(tmp_path):
    """JOURNAL_STREAM names the journal's stream: stderr still on it gets prefixes;
    stderr redirected elsewhere (a file, a pipe to jq) keeps plain JSON."""
    stderr, elsewhere = tmp_path / "stderr", tmp_path / "elsewhere"
    stderr.touch()
    elsewhere.touch()
    on_it = run_with_stderr_in(stderr, identity(stderr))
    assert on_it and all(line[:3] in ("<3>", "<4>", "<6>") for line in on_it)
    assert [json.loads(line[3:])["event"] for line in on_it if line.startswith("<3>")] == ["run_failed"]
    for lines in (
        run_with_stderr_in(stderr, identity(elsewhere)),
        run_with_stderr_in(stderr, None),
        run_with_stderr_in(stderr, identity(stderr), SKYBOT_CLEANUP_SYSLOG_PREFIX="off"),
    ):
        assert lines and all(json.loads(line)["event"] for line in lines)


def test_a_setting_that_fails_still_gets_its_priority(tmp_path):
    """Before the settings load, the crontab's environment decides: the one error line of
    a bad setting is at err too, in either format."""
    env = {"SKYBOT_CLEANUP_SYSLOG_PREFIX": "on", "SKYBOT_CLEANUP_BATCH_SIZE": "0"}
    stderr = tmp_path / "stderr"
    (line,) = run_with_stderr_in(stderr, None, **env)
    assert line.startswith("<3>") and json.loads(line[3:])["event"] == "error"
    (line,) = run_with_stderr_in(stderr, None, **env, SKYBOT_CLEANUP_LOG_FORMAT="console")
    assert line == "<3>skybot-cleanup: error: invalid setting SKYBOT_CLEANUP_BATCH_SIZE: " + (
        "Input should be greater than or equal to 1"
    )
