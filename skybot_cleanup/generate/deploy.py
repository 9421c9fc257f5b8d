"""Deployment files for cron, systemd, Render and Kubernetes, rendered from the registry.

`skybot-cleanup schedule --format F --output deploy/` writes them; the files committed
under deploy/ are this module's output with the default command path, and a test
fails when they drift. Every schedule is UTC.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path

from skybot_cleanup import __version__, schedule
from skybot_cleanup.errors import ExitCode
from skybot_cleanup.generate import HEADER
from skybot_cleanup.localfiles import closing_fd, open_child_directory, open_shared_directory, write_file
from skybot_cleanup.registry import REGISTRY, Job, Registry

DEFAULT_EXEC = "/usr/local/bin/skybot-cleanup"
RENDER_COM_EXEC = "skybot-cleanup"  # on Render.com the virtualenv's bin is on PATH
VENV = "/opt/skybot-cleanup"
DEFAULT_IMAGE = f"skybot-cleanup:{__version__}"
ENV_FILE = "/etc/skybot-cleanup/env"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"  # Debian's node_exporter textfile directory
PYTHON_VERSION = "3.11.9"
# The exit codes the files below name, for str.format: {ok}, {failure}, {config}, {skipped}.
CODES = {code.name.lower(): code for code in ExitCode}
# For cron and systemd: the locked dependencies first, then the tool without resolving
# anything, as the container image installs it (so every host runs the versions CI tested).
INSTALL = (
    f"sudo python3 -m venv {VENV}",
    f"sudo {VENV}/bin/pip install --no-deps -r requirements.lock   # the image's exact versions",
    f"sudo {VENV}/bin/pip install --no-deps --no-build-isolation . && sudo {VENV}/bin/pip check",
)
# Where the files run it by default (without --exec).
LINK = f"sudo ln -s {VENV}/bin/skybot-cleanup {DEFAULT_EXEC}"


def _install_comment() -> str:
    """The install steps as comment lines, for the files that need an installed tool."""
    return "\n".join(f"#   {step}" for step in INSTALL)


# The longest a run may take, whatever its interval: a cleanup that needs longer
# should be drained by hand in batches first.
MAX_DEADLINE_S = 6 * 3600


def deadline_s(job: Job) -> int:
    """Seconds a run may take: 90% of the shortest gap between two of its runs (so a
    hung run is stopped before the next one is due), at most MAX_DEADLINE_S."""
    return min(int(schedule.shortest_interval(job.schedule).total_seconds() * 0.9), MAX_DEADLINE_S)


def _randomized_delay_s(job: Job) -> int:
    """Spread hosts a little: a tenth of the shortest gap, at most a minute."""
    return min(int(schedule.shortest_interval(job.schedule).total_seconds() / 10), 60)


# systemd reads these at the start of ExecStart= as prefixes: "+" would run the command
# outside the unit's sandbox, "-" would ignore its failures.
SYSTEMD_PREFIXES = "@-:+!"


def _checked_exec(path: str) -> str:
    if not path or any(not character.isprintable() for character in path):
        raise ValueError("--exec must be a single line of printable characters")
    if path[0] in SYSTEMD_PREFIXES:
        raise ValueError(f"--exec must not start with any of {SYSTEMD_PREFIXES} (systemd would read it as a prefix)")
    if not path.startswith("/") and "/" in path:
        raise ValueError(f"--exec must be an absolute path (or a bare command name), not {path!r}")
    return path


def crontab(exec_path: str = DEFAULT_EXEC, registry: Registry = REGISTRY) -> dict[str, str]:
    # bash quoting for the command, then cron's own: an unescaped % ends the command.
    command = shlex.quote(_checked_exec(exec_path)).replace("%", "\\%")
    lines = [
        f"# /etc/cron.d/skybot-cleanup: {HEADER}.",
        "#",
        "# The times are in the cron daemon's time zone and the registry's are UTC: install on a host",
        "# whose zone is UTC (timedatectl set-timezone Etc/UTC), or shift the hours by hand (Debian's",
        "# cron ignores CRON_TZ). Runs as the user 'skybot-cleanup'. The tool reads DATABASE_URL and",
        f"# SKYBOT_CLEANUP_* from {ENV_FILE} itself (no shell sourcing, so a URL with & or % is safe).",
        "# Logs are JSON, one syslog record per event (logger --size: its default splits at 1 KiB),",
        "# each at its own priority: the tool starts every line with one (<3> for an error) and",
        "# logger --prio-prefix files it there (user.err) and strips it. --quiet keeps stdout's summary",
        "# lines out of the logs. With pipefail the line's exit status is the tool's, and an exit that",
        f"# is neither {ExitCode.OK} nor {ExitCode.SKIPPED} is also logged at user.err.",
        "# Installed from a checkout of the tool, with its locked dependencies (docs/deployment.md):",
        _install_comment(),
        "SHELL=/bin/bash",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"SKYBOT_CLEANUP_ENV_FILE={ENV_FILE}",
        "SKYBOT_CLEANUP_LOG_FORMAT=json",
        "SKYBOT_CLEANUP_SYSLOG_PREFIX=on",
        "",
    ]
    for job in registry.jobs:
        lines.append(
            f"{job.schedule} skybot-cleanup set -o pipefail; "
            f"{command} {job.name} --quiet 2>&1 | logger --size 65536 --prio-prefix -t skybot-cleanup; rc=$?; "
            f"[ $rc -eq {ExitCode.OK} ] || [ $rc -eq {ExitCode.SKIPPED} ] || "
            f'logger -p user.err -t skybot-cleanup "{job.name} exited $rc"; exit $rc'
        )
    return {"crontab": "\n".join(lines) + "\n"}


SERVICE = """\
# {header}.
# One instance per job: skybot-cleanup@refresh-tokens.service, started by its timer.
# Installed from a checkout of the tool, with its locked dependencies (docs/deployment.md):
{install}
[Unit]
Description=skybot-cleanup %i (SkyBot Inbox database housekeeping)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart={exec_path} %i
# DATABASE_URL and SKYBOT_CLEANUP_* live here, not in the unit: a %-encoded password
# would be read as a unit specifier.
EnvironmentFile={env_file}
Environment=SKYBOT_CLEANUP_LOG_FORMAT=json
# With stderr on the journal (JOURNAL_STREAM), the tool starts each line with its syslog
# priority (<3> for an error): journald strips it and files the line at that priority.
SyslogLevelPrefix=yes
# Type=oneshot has no start timeout of its own; each job's drop-in (deadline.conf)
# sets its own, under the gap to its next run.
TimeoutStartSec={timeout}
# {skipped}: another run holds the job's lock; the overlap is not a failure.
SuccessExitStatus={skipped}
# Configuration errors ({config}) will not fix themselves; a restart would only repeat them.
RestartPreventExitStatus={config}

# One dynamic user for every instance, so they share the state directory, where runs
# the database could not record wait ($STATE_DIRECTORY, /var/lib/private/skybot-cleanup).
DynamicUser=yes
User=skybot-cleanup
StateDirectory=skybot-cleanup
UMask=0077
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectSystem=strict
ProtectHome=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
DevicePolicy=closed
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# node_exporter textfiles: install node-exporter/skybot-cleanup@.service.d/prometheus.conf too.
"""

PROMETHEUS_DROP_IN = """\
# {header}.
# /etc/systemd/system/skybot-cleanup@.service.d/prometheus.conf: node_exporter textfiles.
# The dynamic user writes into Debian's textfile directory through the prometheus group;
# the tool makes its files 0644 whatever the umask, so node_exporter (user prometheus) reads them.
# Once:  sudo chgrp prometheus {textfile_dir} && sudo chmod 2775 {textfile_dir}
[Service]
SupplementaryGroups=prometheus
ReadWritePaths={textfile_dir}
Environment=SKYBOT_CLEANUP_PROM_FILE={textfile_dir}
"""

DEADLINE_DROP_IN = """\
# {header}.
[Service]
TimeoutStartSec={deadline}s
"""

TIMER = """\
# {header}.
[Unit]
Description=skybot-cleanup {name} ({schedule} UTC)

[Timer]
{calendars}
Persistent=true
RandomizedDelaySec={delay}
AccuracySec=1s
Unit=skybot-cleanup@{name}.service

[Install]
WantedBy=timers.target
"""


def _systemd_exec(path: str) -> str:
    """ExecStart= quoting: % is a specifier, $ an expansion, a space splits words. A quote
    or a backslash in an executable's name is refused: systemd cannot take it."""
    path = _checked_exec(path)
    if any(character in path for character in "\"'\\"):
        raise ValueError("--exec for systemd must not hold a quote or a backslash: systemd cannot run such a path")
    path = path.replace("%", "%%").replace("$", "$$")
    return f'"{path}"' if re.search(r"\s", path) else path


def systemd(exec_path: str = DEFAULT_EXEC, registry: Registry = REGISTRY) -> dict[str, str]:
    longest = max(deadline_s(job) for job in registry.jobs)
    files = {
        "systemd/skybot-cleanup@.service": SERVICE.format(
            header=HEADER,
            install=_install_comment(),
            exec_path=_systemd_exec(exec_path),
            env_file=ENV_FILE,
            timeout=f"{longest}s",
            **CODES,
        ),
        "systemd/node-exporter/skybot-cleanup@.service.d/prometheus.conf": PROMETHEUS_DROP_IN.format(
            header=HEADER, textfile_dir=TEXTFILE_DIR
        ),
    }
    for job in registry.jobs:
        calendars = "\n".join(f"OnCalendar={calendar}" for calendar in schedule.to_oncalendar(job.schedule))
        files[f"systemd/skybot-cleanup@{job.name}.service.d/deadline.conf"] = DEADLINE_DROP_IN.format(
            header=HEADER, deadline=deadline_s(job)
        )
        files[f"systemd/skybot-cleanup-{job.name}.timer"] = TIMER.format(
            header=HEADER, name=job.name, schedule=job.schedule, calendars=calendars, delay=_randomized_delay_s(job)
        )
    return files


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_com_blueprint(exec_path: str = RENDER_COM_EXEC, registry: Registry = REGISTRY) -> dict[str, str]:
    """render.yaml: one Render.com cron job per job."""
    command = shlex.quote(_checked_exec(exec_path))
    lines = [
        f"# {HEADER}.",
        "# Merge these services into the app's render.yaml. Each is a cron job built from this",
        "# tool's repository (set `repo:` to it when the app's Blueprint lives elsewhere).",
        "# Render cron schedules are UTC; Render runs at most one run of a job at a time, and counts",
        f"# any exit code but {ExitCode.OK} as a failed run: a skipped run (lock held) exits {ExitCode.OK} here.",
        "services:",
    ]
    for job in registry.jobs:
        lines += [
            "  - type: cron",
            f"    name: skybot-cleanup-{job.name}",
            "    runtime: python",
            f'    schedule: "{job.schedule}"',
            "    buildCommand: pip install -c requirements.lock .",
            f"    startCommand: {_yaml_string(f'{command} {job.name}')}",
            "    envVars:",
            "      - key: PYTHON_VERSION",
            f'        value: "{PYTHON_VERSION}"',
            "      - key: DATABASE_URL",
            "        fromDatabase:",
            "          name: skybot-inbox-db",
            "          property: connectionString",
            "      - key: SKYBOT_CLEANUP_LOG_FORMAT",
            "        value: json",
            "      - key: SKYBOT_CLEANUP_SKIPPED_EXIT_CODE",
            f'        value: "{ExitCode.OK}"',
        ]
    return {"render.yaml": "\n".join(lines) + "\n"}


CRONJOB = """\
# {header}.
apiVersion: batch/v1
kind: CronJob
metadata:
  name: skybot-cleanup-{name}
  labels:
    app.kubernetes.io/name: skybot-cleanup
    app.kubernetes.io/component: {name}
spec:
  schedule: "{schedule}"
  timeZone: Etc/UTC
  concurrencyPolicy: Forbid
  # Without a deadline, a CronJob that misses 100 schedules stops for good.
  startingDeadlineSeconds: {starting_deadline}
  successfulJobsHistoryLimit: 3
  failedJobsHistoryLimit: 3
  jobTemplate:
    spec:
      backoffLimit: 2
      activeDeadlineSeconds: {deadline}
      podFailurePolicy:
        rules:
          # Exit {config} is a configuration error: retrying cannot fix it. (onPodConditions:
          # required, even empty, before Kubernetes 1.29.)
          - action: FailJob
            onExitCodes:
              containerName: skybot-cleanup
              operator: In
              values: [{config}]
            onPodConditions: []
      template:
        metadata:
          labels:
            app.kubernetes.io/name: skybot-cleanup
            app.kubernetes.io/component: {name}
        spec:
          restartPolicy: Never
          # The tool never talks to the Kubernetes API.
          automountServiceAccountToken: false
          securityContext:
            runAsNonRoot: true
            runAsUser: 10001
            seccompProfile:
              type: RuntimeDefault
          containers:
            - name: skybot-cleanup
              image: {image}
              command: [{command}, "{name}"]
              env:
                - name: DATABASE_URL
                  valueFrom:
                    secretKeyRef:
                      name: skybot-cleanup
                      key: DATABASE_URL
                - name: SKYBOT_CLEANUP_LOG_FORMAT
                  value: json
                # A pod exiting {skipped} counts as failed: a skipped run (lock held) exits {ok}.
                - name: SKYBOT_CLEANUP_SKIPPED_EXIT_CODE
                  value: "{ok}"
              resources:
                requests:
                  cpu: 50m
                  memory: 96Mi
                limits:
                  memory: 256Mi
              securityContext:
                allowPrivilegeEscalation: false
                readOnlyRootFilesystem: true
                capabilities:
                  drop: [ALL]
"""

# The base image by digest, so that a rebuild of one commit starts from the same bytes (a
# tag moves with every Debian and Python patch release). Refresh it, with the tag it came
# from, by `docker buildx imagetools inspect python:3.11-slim` (its "Digest:" line), or let
# Renovate or Dependabot's docker updater do it.
BASE_IMAGE = "python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7"

DOCKERFILE = """\
# {header}.
# The image the CronJobs run: docker build -f deploy/kubernetes/Dockerfile -t {image} .
FROM {base_image}
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin skybot-cleanup
WORKDIR /src
# The dependencies first, at the lock's exact versions: this layer is rebuilt only when
# requirements.lock changes, not on every change of the code.
COPY requirements.lock ./
RUN pip install --no-cache-dir --no-deps -r requirements.lock
# The tool last, built by the locked setuptools; pip check proves the lock satisfies it.
COPY pyproject.toml README.md ./
COPY skybot_cleanup ./skybot_cleanup
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && pip check && rm -rf /src
WORKDIR /
USER 10001
ENTRYPOINT [{command}]
CMD ["--help"]
"""


def kubernetes(
    exec_path: str = DEFAULT_EXEC, registry: Registry = REGISTRY, image: str = DEFAULT_IMAGE
) -> dict[str, str]:
    command = _yaml_string(_checked_exec(exec_path))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*", image):
        raise ValueError(f"--image {image!r} is not an image reference")
    files = {
        "kubernetes/Dockerfile": DOCKERFILE.format(header=HEADER, image=image, command=command, base_image=BASE_IMAGE)
    }
    for job in registry.jobs:
        deadline = deadline_s(job)
        files[f"kubernetes/{job.name}.yaml"] = CRONJOB.format(
            header=HEADER,
            name=job.name,
            schedule=job.schedule,
            deadline=deadline,
            starting_deadline=min(deadline, 600),
            image=image,
            command=command,
            **CODES,
        )
    return files


def monitoring(exec_path: str | None = None, registry: Registry = REGISTRY) -> dict[str, str]:
    from skybot_cleanup.generate.alerts import files

    return files(registry)


FORMATS: dict[str, Callable[..., dict[str, str]]] = {
    "crontab": crontab,
    "systemd": systemd,
    "render": render_com_blueprint,
    "kubernetes": kubernetes,
    "monitoring": monitoring,
}


def render_files(
    fmt: str, exec_path: str | None = None, image: str | None = None, registry: Registry = REGISTRY
) -> dict[str, str]:
    options: dict[str, object] = {"registry": registry}
    if exec_path:
        options["exec_path"] = exec_path
    if image:
        if fmt != "kubernetes":
            raise ValueError("--image applies to --format kubernetes only")
        options["image"] = image
    return FORMATS[fmt](**options)


def write_files(files: dict[str, str], output: Path) -> list[Path]:
    """Each file 0644, written exclusively then renamed into place, in directories opened
    without following a link: a link planted under `output` (/tmp, say) is replaced or
    refused, never written through. Raises OSError (UnsafePath for a refused path)."""
    written = []
    with closing_fd(open_shared_directory(output)) as root:
        for relative, text in files.items():
            *folders, name = Path(relative).parts
            directory = os.dup(root)
            try:
                for folder in folders:
                    child = open_child_directory(directory, folder)
                    os.close(directory)
                    directory = child
                write_file(directory, name, text.encode(), 0o644)
            finally:
                os.close(directory)
            written.append(output / relative)
    return written
