"""Prometheus series in node_exporter textfiles (and the Pushgateway): every series the
tool exports is defined here.

Two kinds of file, never sharing a series (node_exporter rejects duplicates):
- one per job run (`skybot_cleanup_<task>.prom`, the metrics job's as
  `skybot_cleanup_metrics.prom`): the batch-job series, led by
  skybot_cleanup_last_success_timestamp_seconds, which survives any failure, an
  unreachable database and dry runs (a dry run writes nothing);
- the metrics job's snapshot (`skybot_cleanup_snapshot.prom`).
Files are written to a temporary file, made 0644 whatever the umask (node_exporter
reads them as another user), and renamed into place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from skybot_cleanup import schedule
from skybot_cleanup.clock import epoch, parse_iso, utc_now
from skybot_cleanup.errors import ExitCode
from skybot_cleanup.heartbeat import open_url, within
from skybot_cleanup.localfiles import (
    closing_fd,
    open_directory_through_trusted_links,
    read_regular_file,
    write_file,
)
from skybot_cleanup.registry import REGISTRY, Job
from skybot_cleanup.results import RunResult
from skybot_cleanup.vocabulary import RunStatus

if TYPE_CHECKING:
    from skybot_cleanup.metrics import Snapshot

PREFIX = "skybot_cleanup"
LAST_SUCCESS = f"{PREFIX}_last_success_timestamp_seconds"


def textfile_path(setting: str, job: str) -> Path:
    """A directory gets one file per job; {task} in a path is replaced by the job's
    name; any other path gets the job's name before its extension, so that jobs
    scheduled apart never overwrite each other's series."""
    path = Path(setting)
    if path.is_dir() or setting.endswith("/"):
        return path / f"{PREFIX}_{job}.prom"
    if "{task}" in setting:
        return Path(setting.replace("{task}", job))
    return path.with_name(f"{path.stem}_{job}{path.suffix or '.prom'}")


# A textfile is a few kilobytes: the previous one is read up to this much.
MAX_TEXTFILE_BYTES = 1024 * 1024


def write_textfile(path: Path, registry: CollectorRegistry) -> None:
    """Atomic, 0644, no timestamps: what node_exporter's textfile collector wants. The
    directory is reached through no link another user planted (a root run would write
    wherever it points); the new file is created exclusively and renamed over the path:
    a link or anything else planted there is replaced, never written through. Raises
    OSError."""
    with closing_fd(open_directory_through_trusted_links(path.parent)) as directory:
        write_file(directory, path.name, generate_latest(registry), 0o644)


def previous_value(path: Path, name: str, task: str) -> float | None:
    """A series' value in the file the last run wrote, if it is a regular file: never read
    through a link (a root run would copy another file's value into a public one), never
    waiting on a FIFO, and never more than MAX_TEXTFILE_BYTES."""
    try:
        with closing_fd(open_directory_through_trusted_links(path.parent)) as directory:
            text = read_regular_file(path.name, MAX_TEXTFILE_BYTES, directory=directory).decode("utf-8", "replace")
    except OSError:
        return None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels.get("task") == task:
                    return float(sample.value)
    except ValueError:
        return None
    return None


def run_registry(job: Job, result: RunResult, last_success: float | None) -> CollectorRegistry:
    """A job's run series, from its last run's result."""
    registry = CollectorRegistry()
    labels = ("task",)

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", doc, labels, registry=registry)

    finished = parse_iso(result.finished_at) if result.finished_at else utc_now()
    gauge("last_run_timestamp_seconds", "Unix time the job's last run finished.").labels(job.name).set(epoch(finished))
    codes = ", ".join(f"{code} {code.name.lower()}" for code in ExitCode)
    gauge("last_exit_code", f"Exit code of the job's last run ({codes}).").labels(job.name).set(result.exit_code)
    gauge("last_duration_seconds", "Duration of the job's last run.").labels(job.name).set(result.duration_ms / 1000)
    gauge("last_rows", "Rows deleted by the job's last run.").labels(job.name).set(result.rows)
    if last_success is not None:
        Gauge(LAST_SUCCESS, "Unix time of the job's last successful run.", labels, registry=registry).labels(
            job.name
        ).set(last_success)
    if result.replica_wait_s is not None:
        gauge(
            "last_replica_wait_seconds", "Seconds the job's last run waited between batches for streaming standbys."
        ).labels(job.name).set(result.replica_wait_s)
    if result.clock_skew_s is not None:
        gauge(
            "clock_skew_seconds", "How far this host's clock was ahead of the database server's (negative: behind)."
        ).labels(job.name).set(result.clock_skew_s)
    gauge("schedule_interval_seconds", "Longest gap between two scheduled runs of the job.").labels(job.name).set(
        schedule.interval(job.schedule).total_seconds()
    )
    gauge("next_run_timestamp_seconds", "Unix time of the job's next scheduled run.").labels(job.name).set(
        epoch(schedule.next_runs(job.schedule, finished)[0])
    )
    return registry


def write_run_textfiles(setting: str, results: Iterable[RunResult], jobs: Mapping[str, Job]) -> list[tuple[Path, str]]:
    """One file per job, after real runs (dry runs leave them alone). The last success is
    this run's, else the newer of the previous file's and the history's (read as the run
    was recorded), so the series never vanishes, and a first run that was skipped or
    failed still has it. Each file stands alone: the ones that cannot be written are
    returned with why."""
    failed = []
    for result in results:
        if result.dry_run:
            continue
        job = jobs[result.task]
        path = textfile_path(setting, job.name)
        if result.status == RunStatus.OK:
            last_success: float | None = epoch(parse_iso(result.finished_at) if result.finished_at else utc_now())
        else:
            known = [previous_value(path, LAST_SUCCESS, job.name)]
            known.append(epoch(parse_iso(result.last_success_at)) if result.last_success_at else None)
            last_success = max((value for value in known if value is not None), default=None)
        try:
            write_textfile(path, run_registry(job, result, last_success))
        except OSError as exc:
            failed.append((path, exc.strerror or str(exc)))
    return failed


def snapshot_registry(snapshot: Snapshot) -> CollectorRegistry:
    """The metrics job's snapshot in Prometheus terms."""
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", doc, labels, registry=registry)

    gauge("snapshot_timestamp_seconds", "Unix time of this snapshot.").set(epoch(parse_iso(snapshot.taken_at)))
    helps = {measure.name: measure.help for measure in REGISTRY.measures}
    for name, value in snapshot.measures.items():
        if value is not None:
            gauge(name, helps.get(name) or name.replace("_", " ").capitalize() + ".").set(value)
    if snapshot.database_size_bytes is not None:
        gauge("database_size_bytes", "Size of the database on disk.").set(snapshot.database_size_bytes)
    gauge("query_latency_seconds", "Round trip of the snapshot's first message to the database.").set(
        snapshot.latency_seconds
    )
    gauge("snapshot_errors", "Tasks and tables the snapshot could not measure (missing table or column).").set(
        len(snapshot.errors)
    )

    due = gauge("due_rows", "Rows the next run of the task would delete (an estimate past 10,000).", ("task",))
    age = gauge("oldest_due_age_seconds", "How long the oldest due row has been due.", ("task",))
    overdue = gauge("task_overdue", "1 when the task has had no success within two scheduled intervals.", ("task",))
    measured = gauge(
        "backlog_measured", "1 when the task's backlog was measured; 0 when it could not be (see errors).", ("task",)
    )
    for task in snapshot.tasks:
        measured.labels(task.name).set(0 if task.due_rows is None else 1)
        if task.due_rows is not None:
            due.labels(task.name).set(task.due_rows)
        if task.oldest_due_age_seconds is not None:
            age.labels(task.name).set(task.oldest_due_age_seconds)
        if task.overdue is not None:
            overdue.labels(task.name).set(int(task.overdue))

    rows = gauge("table_rows", "Rows in the table (planner estimate on PostgreSQL).", ("table",))
    size = gauge("table_size_bytes", "Table size on disk, indexes and TOAST included.", ("table",))
    dead = gauge("table_dead_tuples", "Dead tuples waiting for vacuum.", ("table",))
    vacuumed = gauge("table_last_vacuum_timestamp_seconds", "Last (auto)vacuum of the table.", ("table",))
    analyzed = gauge("table_last_analyze_timestamp_seconds", "Last (auto)analyze of the table.", ("table",))
    for table in snapshot.tables:
        for metric, value in ((rows, table.rows), (size, table.size_bytes), (dead, table.dead_tuples)):
            if value is not None:
                metric.labels(table.name).set(value)
        for metric, moment in ((vacuumed, table.last_vacuum), (analyzed, table.last_analyze)):
            if moment:
                metric.labels(table.name).set(epoch(parse_iso(moment)))
    return registry


# The longest a push to the Pushgateway may take, connect, redirects and reply included.
PUSH_TIMEOUT_S = 10.0


def push(url: str, registry: CollectorRegistry) -> None:
    """The snapshot to a Pushgateway, within one total deadline (a gateway that answers a
    byte at a time would hold a socket timeout forever), following only http(s)
    redirects. Raises on any failure."""
    from prometheus_client import push_to_gateway

    timeout = PUSH_TIMEOUT_S
    within(timeout, lambda: push_to_gateway(url, job=PREFIX, registry=registry, timeout=timeout, handler=_handler))


def _handler(url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes) -> Any:
    """prometheus_client's default handler, through heartbeat.open_url (which raises
    HTTPError for an error status, as urllib does)."""
    import urllib.request

    def send() -> None:
        request = urllib.request.Request(url, data=data, method=method, headers=dict(headers))  # noqa: S310
        open_url(request, timeout=timeout or PUSH_TIMEOUT_S).close()

    return send
