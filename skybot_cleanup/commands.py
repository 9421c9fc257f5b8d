"""What each command does, as plain functions of the settings (the CLI only parses,
renders and exits). Usable from Python as they are."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from skybot_cleanup import db
from skybot_cleanup.cleanup import ProgressCallback, RunResult, database_target, finish, run_task
from skybot_cleanup.clock import iso_utc, parse_iso, utc_now
from skybot_cleanup.errors import (
    EXIT_OK,
    CleanupError,
    Failure,
    Interrupted,
    classify,
    is_connection_failure,
    print_traceback_when_debugging,
)
from skybot_cleanup.logs import get_logger
from skybot_cleanup.retry import with_retries
from skybot_cleanup.settings import CleanupSettings
from skybot_cleanup.tasks import REGISTRY, Job, Registry, Task

if TYPE_CHECKING:  # the reporting modules load only for the commands that use them
    from skybot_cleanup import history, metrics, status
    from skybot_cleanup.check import Finding

T = TypeVar("T")
ProgressFactory = Callable[[Task], AbstractContextManager[ProgressCallback | None]]


# -- cleanups ---------------------------------------------------------------------------------


def cleanup(
    settings: CleanupSettings, tasks: Sequence[Task], *, dry_run: bool = False, progress: ProgressFactory | None = None
) -> Iterator[RunResult]:
    """Run tasks in turn, each in its own transaction (or batches), yielding each result
    as it ends; stop after a run that a signal interrupted or followed."""
    for task in tasks:
        with progress(task) if progress else nullcontext() as on_progress:
            result = run_task(settings, task, dry_run=dry_run, on_progress=on_progress)
        yield result
        if result.status == "interrupted" or result.signal is not None:
            return


def write_run_textfiles(
    settings: CleanupSettings, results: Sequence[RunResult], registry: Registry = REGISTRY
) -> list[Path]:
    """After real runs: their node_exporter textfiles (dry runs leave them alone)."""
    if not settings.prom_file:
        return []
    from skybot_cleanup import prometheus  # prometheus_client costs ~10 ms to import: only when used

    jobs = {job.name: job for job in registry.jobs}
    outcomes = [
        prometheus.RunOutcome(
            job=jobs[result.task],
            exit_code=result.exit_code,
            succeeded=result.status == "ok",
            finished=parse_iso(result.finished_at) if result.finished_at else utc_now(),
            duration_s=result.duration_ms / 1000,
            rows=result.rows,
        )
        for result in results
        if not result.dry_run
    ]
    return prometheus.write_run_textfiles(settings.prom_file, outcomes)


def record_failed_start(
    salvaged: dict[str, str | None], jobs: Sequence[Job], exit_code: int, error: str, *, dry_run: bool = False
) -> None:
    """A command that could not even start (an invalid setting or URL) still leaves its
    traces, with what can be read of the settings: each job's textfile says it ran and
    failed (keeping its last success), the heartbeat gets the exit code, and the history
    gets a failed run, spooled until a run reaches the database. Never raises."""
    import socket
    import uuid

    from skybot_cleanup.heartbeat import check_url, ping_once

    now = utc_now()
    if salvaged.get("prom_file") and not dry_run:
        from skybot_cleanup import prometheus

        with contextlib.suppress(OSError):
            prometheus.write_run_textfiles(
                str(salvaged["prom_file"]),
                [prometheus.RunOutcome(job=job, exit_code=exit_code, succeeded=False, finished=now) for job in jobs],
            )
    ping_url = salvaged.get("ping_url")
    run_ids = {job.name: str(uuid.uuid4()) for job in jobs}
    if ping_url and not dry_run and check_url(ping_url) is None:
        for job in jobs:
            ping_once(ping_url, job.name, str(exit_code), run_ids[job.name], body=f"status=failed error={error}")
    if (salvaged.get("history") or "true").lower() in ("0", "false", "no", "off"):
        return
    try:
        identity = db.parse_database_url(salvaged.get("database_url"), salvaged.get("schema_name")).identity
    except Exception:  # the URL itself may be what is wrong: no database to record it for
        return
    from skybot_cleanup import history

    spool = history.Spool(history.state_directory(salvaged.get("state_dir")) / "pending-runs")
    for job in jobs:
        row = {
            "run_id": run_ids[job.name],
            "task": job.name,
            "status": "failed",
            "dry_run": dry_run,
            "rows": 0,
            "cutoff": now,
            "finished_at": now,
            "duration_ms": 0,
            "exit_code": exit_code,
            "host": socket.gethostname(),
            "error_class": "ConfigError",
            "error": error,
        }
        with contextlib.suppress(OSError):
            spool.add(identity, row)


# -- reporting commands -----------------------------------------------------------------------


@contextmanager
def _reading(settings: CleanupSettings, label: str) -> Iterator[tuple[Any, db.DatabaseTarget]]:
    target = database_target(settings)
    engine = db.create_engine(target, settings, label)
    try:
        yield engine, target
    finally:
        engine.dispose()


def _read(
    settings: CleanupSettings,
    label: str,
    work: Callable[[db.RunConnection, str | None, datetime], T],
    *,
    read_only: bool = True,
) -> T:
    """work(run, schema, now) in a bounded read-only transaction, retried when transient."""
    with _reading(settings, label) as (engine, target):

        def attempt() -> T:
            with db.run_transaction(engine, settings, label, read_only=read_only) as run:
                return work(run, target.schema, utc_now())

        return with_retries(settings, attempt, log=get_logger(), reporting=True)


@dataclass
class MetricsRun:
    result: RunResult  # the metrics job as a run, recorded and pinged like a cleanup
    snapshot: metrics.Snapshot | None


def metrics_job(
    settings: CleanupSettings,
    snapshot_file: str | None = None,
    pushgateway: str | None = None,
    registry: Registry = REGISTRY,
) -> MetricsRun:
    """Take the snapshot, record it, deliver it; the job's own outcome is recorded like a
    cleanup run's (history row, heartbeat, textfile), failed when a task could not be
    measured or the snapshot could not be delivered."""
    import time
    import uuid

    from skybot_cleanup import heartbeat, history, metrics

    job, run_id, now, started = registry.metrics, str(uuid.uuid4()), utc_now(), time.monotonic()
    pinger = heartbeat.Pinger.from_settings(settings, job.name, run_id)
    taken: metrics.Snapshot | None = None
    target: db.DatabaseTarget | None = None
    engine = None
    failure: Failure | None = None
    unreachable = False
    try:
        target = database_target(settings)
        engine = db.create_engine(target, settings, job.name)
        pinger.ping("start")

        def attempt() -> metrics.Snapshot:
            assert engine is not None and target is not None
            with db.run_transaction(engine, settings, job.name, read_only=True) as run:
                return metrics.collect(run.conn, settings, target.schema, now, registry)

        taken = with_retries(settings, attempt, log=get_logger(), reporting=True)
        # After the read transaction: on SQLite an open reader would block this write.
        history.record_snapshot(engine, settings, now, json.dumps(taken.as_dict()))
        try:
            deliver_snapshot(taken, snapshot_file, pushgateway)
        except Exception as exc:  # a monitoring sink down: the job failed, and says which sink
            raise CleanupError(f"metrics were collected but not delivered: {type(exc).__name__}: {exc}") from None
        if taken.errors:
            raise CleanupError("; ".join(taken.errors))
    except (Exception, Interrupted) as exc:
        print_traceback_when_debugging(exc)
        failure = failure_of(exc, settings)
        unreachable = is_connection_failure(exc)
        get_logger().error(
            "run_failed", task=job.name, run_id=run_id, error_class=failure.error_class, error=failure.message
        )
    result = RunResult(
        task=job.name,
        status=failure.status if failure else "ok",
        dry_run=False,
        rows=0,
        cutoff=iso_utc(now) or "",
        duration_ms=round((time.monotonic() - started) * 1000),
        run_id=run_id,
        exit_code=failure.exit_code if failure else EXIT_OK,
        started_at=iso_utc(now),
        finished_at=iso_utc(utc_now()),
        error_class=failure.error_class if failure else None,
        error=failure.message if failure else None,
    )
    finish(settings, result, target, None if unreachable else engine, pinger, engine.dispose if engine else None)
    return MetricsRun(result, taken)


def deliver_snapshot(taken: metrics.Snapshot, prom_file: str | None, pushgateway: str | None) -> None:
    from skybot_cleanup import prometheus

    registry = prometheus.snapshot_registry(taken)
    if prom_file:
        prometheus.write_textfile(Path(prom_file), registry)
    if pushgateway:
        prometheus.push(pushgateway, registry)


def job_status(settings: CleanupSettings, registry: Registry = REGISTRY) -> status.Status:
    """Every job's health. If the history does not yet know when the tool first saw this
    database, it is recorded now (a fresh install is PENDING for a while, not forever);
    if the history cannot be read or written at all, the jobs are UNKNOWN."""
    from skybot_cleanup import history, status

    with _reading(settings, "status") as (engine, target):
        spooled = history.Spool.for_settings(settings).entries(target.identity)

        def read(unknown: str | None) -> status.Status:
            def attempt() -> status.Status:
                with db.run_transaction(engine, settings, "status", read_only=True) as run:
                    return status.collect(run.conn, settings, target.schema, utc_now(), registry, spooled, unknown)

            return with_retries(settings, attempt, log=get_logger(), reporting=True)

        if not settings.history:
            return read("run history is off (SKYBOT_CLEANUP_HISTORY=false)")
        seen = read(None)
        if seen.history_available and seen.first_seen is not None:
            return seen
        problem = history.ensure_seen(engine, settings)
        return read(
            None if problem is None else f"no run history ({problem}): `skybot-cleanup check` says how to fix it"
        )


def check(settings: CleanupSettings, registry: Registry = REGISTRY) -> list[Finding]:
    from skybot_cleanup.check import run_checks

    return _read(settings, "check", lambda run, schema, now: run_checks(run, settings, schema, now, registry))


@dataclass
class HistoryView:
    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    pending_local: int  # runs waiting in the state directory for the database


def run_history(settings: CleanupSettings, query: history.HistoryQuery) -> HistoryView:
    from skybot_cleanup import history

    def work(run: db.RunConnection, _schema: str | None, _now: datetime) -> HistoryView:
        spool = history.Spool(history.state_directory(settings) / "pending-runs")
        return HistoryView(
            list(history.list_runs(run.conn, settings, query)),
            history.summarize(run.conn, settings, query),
            len(spool.entries(database_target(settings).identity)),
        )

    return _read(settings, "history", work)


def failure_of(exc: BaseException, settings: CleanupSettings | None = None) -> Failure:
    secrets: tuple[str, ...] = settings.secrets() if settings else ()
    try:
        if settings is not None:
            secrets += database_target(settings).secrets
    except Exception:  # noqa: S110 - the URL itself may be what is wrong
        pass
    return classify(exc, secrets)


def exit_code_of(results: Sequence[RunResult]) -> int:
    from skybot_cleanup.errors import worst_exit_code

    return worst_exit_code(result.exit_code for result in results) if results else EXIT_OK
