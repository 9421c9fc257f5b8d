"""The deploy/ files: generated from the registry, verified by the schedulers' own tools."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from cronsim import CronSim
from typer.main import get_command

from conftest import CONSOLE_SCRIPT, run_cli
from skybot_cleanup.cli import app
from skybot_cleanup.deploy import DEFAULT_EXEC, FORMATS, render_files
from skybot_cleanup.schedule import next_runs
from skybot_cleanup.tasks import JOBS

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BASE = datetime(2026, 11, 28, 22, 31, tzinfo=timezone.utc)
SUBCOMMANDS = set(get_command(app).commands)
systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def expected_runs(job, count=6) -> list[datetime]:
    return next_runs(job.schedule, BASE, count)


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
        ["skybot-cleanup@.service"] + [f"skybot-cleanup-{job.name}.timer" for job in JOBS])
    printed = run_cli("schedule", "--format", "crontab")
    assert printed.stdout == (DEPLOY / "crontab").read_text()
    wrong = run_cli("schedule", "--format", "launchd")
    assert wrong.returncode == 2
    assert wrong.stderr == ("skybot-cleanup: error: --format must be one of crontab, systemd, render, kubernetes, "
                            "not 'launchd'\n")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_exec_lands_in_every_artefact(fmt):
    files = render_files(fmt, "/opt/venvs/skybot/bin/skybot-cleanup")
    runners = [text for name, text in files.items() if not name.endswith(".timer")]
    assert runners and all("/opt/venvs/skybot/bin/skybot-cleanup" in text for text in runners)
    assert all(DEFAULT_EXEC not in text for text in files.values())


def crontab_entries() -> list[tuple[str, str, str]]:
    entries = []
    for line in (DEPLOY / "crontab").read_text().splitlines():
        if not line or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        fields = line.split(None, 6)
        entries.append((" ".join(fields[:5]), fields[5], fields[6]))
    return entries


def test_crontab_lines_give_the_registrys_run_times():
    entries = crontab_entries()
    assert len(entries) == len(JOBS)
    for job, (schedule, user, command) in zip(JOBS, entries):
        assert user == "skybot-cleanup"
        assert list(zip(range(6), CronSim(schedule, BASE))) == list(enumerate(expected_runs(job)))
        assert f"{DEFAULT_EXEC} {job.name} 2>&1 | logger -t skybot-cleanup" in command
        assert command.startswith("set -o pipefail;")
        assert "%" not in command  # cron turns % into newlines
        assert job.name in SUBCOMMANDS


def test_crontab_environment():
    text = (DEPLOY / "crontab").read_text()
    assert "SHELL=/bin/bash\n" in text
    assert re.search(r"^PATH=/", text, re.M)
    assert "SKYBOT_CLEANUP_ENV_FILE=/etc/skybot-cleanup/env\n" in text
    assert "CRON_TZ" not in text.replace("ignores CRON_TZ", "")


@pytest.mark.parametrize("exit_code, error_logged", [(0, False), (3, True), (75, False)])
def test_crontab_line_keeps_the_exit_status(tmp_path, exit_code, error_logged):
    """The real line, run by bash as cron runs it, with stand-ins for the tool and logger."""
    (tmp_path / "skybot-cleanup").write_text(f"#!/bin/sh\necho boom\nexit {exit_code}\n")
    (tmp_path / "logger").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/syslog\ncat >> {tmp_path}/syslog\n')
    for name in ("skybot-cleanup", "logger"):
        (tmp_path / name).chmod(0o755)
    _schedule, _user, command = crontab_entries()[1]
    command = command.replace(DEFAULT_EXEC, str(tmp_path / "skybot-cleanup"))
    completed = subprocess.run(["/bin/bash", "-c", command], capture_output=True, text=True,
                               env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert completed.returncode == exit_code
    syslog = (tmp_path / "syslog").read_text()
    assert syslog.startswith("-t skybot-cleanup\nboom\n")
    assert (f"-p user.err -t skybot-cleanup refresh-tokens exited {exit_code}" in syslog) == error_logged


@systemd_analyze
def test_systemd_units_verify_without_any_warning(tmp_path):
    files = render_files("systemd", str(CONSOLE_SCRIPT))  # verify checks the executable exists
    for relative, text in files.items():
        (tmp_path / Path(relative).name).write_text(text)
    units = [tmp_path / f"skybot-cleanup@{job.name}.service" for job in JOBS]
    units += [tmp_path / f"skybot-cleanup-{job.name}.timer" for job in JOBS]
    for unit in units:
        if unit.suffix == ".service":
            shutil.copy(tmp_path / "skybot-cleanup@.service", unit)
    completed = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                               capture_output=True, text=True, cwd=tmp_path)
    # verify exits 0 on a misspelled key: any output at all is a failure.
    assert (completed.returncode, completed.stdout, completed.stderr) == (0, "", "")


@systemd_analyze
@pytest.mark.parametrize("job", JOBS, ids=lambda job: job.name)
def test_timer_calendar_agrees_with_the_registry(job):
    text = (DEPLOY / "systemd" / f"skybot-cleanup-{job.name}.timer").read_text()
    calendar = re.search(r"^OnCalendar=(.+)$", text, re.M).group(1)
    assert calendar.endswith(" UTC")
    completed = subprocess.run(
        ["systemd-analyze", "calendar", "--iterations=6", f"--base-time={BASE:%Y-%m-%d %H:%M:%S} UTC", calendar],
        capture_output=True, text=True, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    elapses = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", completed.stdout)
    assert [datetime.fromisoformat(e).replace(tzinfo=timezone.utc) for e in elapses] == expected_runs(job)
    assert f"Unit=skybot-cleanup@{job.name}.service" in text
    assert "Persistent=true" in text and "AccuracySec=1s" in text


@systemd_analyze
def test_service_hardening_exposure_is_at_most_2():
    completed = subprocess.run(["systemd-analyze", "security", "--offline=true",
                                str(DEPLOY / "systemd" / "skybot-cleanup@.service")],
                               capture_output=True, text=True)
    score = float(re.search(r"Overall exposure level for .*: (\d+\.\d+)", completed.stdout).group(1))
    assert score <= 2.0, completed.stdout


def test_service_essentials():
    text = (DEPLOY / "systemd" / "skybot-cleanup@.service").read_text()
    for line in ("Type=oneshot", "EnvironmentFile=/etc/skybot-cleanup/env", "TimeoutStartSec=1h",
                 "SuccessExitStatus=75", "DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "PrivateTmp=yes", f"ExecStart={DEFAULT_EXEC} %i"):
        assert f"\n{line}\n" in text, line


def test_render_blueprint():
    blueprint = yaml.safe_load((DEPLOY / "render.yaml").read_text())
    services = blueprint["services"]
    assert [s["name"] for s in services] == [f"skybot-cleanup-{job.name}" for job in JOBS]
    for job, service in zip(JOBS, services):
        assert (service["type"], service["runtime"], service["schedule"]) == ("cron", "python", job.schedule)
        program, subcommand = service["startCommand"].split()
        assert program == "skybot-cleanup" and subcommand == job.name and subcommand in SUBCOMMANDS
        assert service["buildCommand"] == "pip install ."
        env = {e["key"]: e for e in service["envVars"]}
        assert re.fullmatch(r"3\.11\.\d+", env["PYTHON_VERSION"]["value"])
        assert env["DATABASE_URL"]["fromDatabase"] == {"name": "skybot-inbox-db", "property": "connectionString"}


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
        rule = job_spec["podFailurePolicy"]["rules"][0]
        assert (rule["action"], rule["onExitCodes"]["values"]) == ("FailJob", [2])
        pod = job_spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        (container,) = pod["containers"]
        assert container["command"] == [DEFAULT_EXEC, job.name] and job.name in SUBCOMMANDS
        url = next(e for e in container["env"] if e["name"] == "DATABASE_URL")
        assert url["valueFrom"]["secretKeyRef"] == {"name": "skybot-cleanup", "key": "DATABASE_URL"}
    dockerfile = (DEPLOY / "kubernetes" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "USER 10001" in dockerfile
    assert f'ENTRYPOINT ["{DEFAULT_EXEC}"]' in dockerfile


def test_every_job_has_a_subcommand():
    assert {job.name for job in JOBS} <= SUBCOMMANDS
