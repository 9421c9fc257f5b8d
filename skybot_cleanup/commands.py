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
from skybot_cleanup.cleanup import ProgressCallback, RunResult, database_target, run_task
from skybot_cleanup.clock import parse_iso, utc_now
from skybot_cleanup.errors import EXIT_OK, Failure, classify
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
) -> list[RunResult]:
    """Run tasks in turn, each in its own transaction (or batches); stop at a signal."""
    results = []
    for task in tasks:
        with progress(task) if progress else nullcontext() as on_progress:
            result = run_task(settings, task, dry_run=dry_run, on_progress=on_progress)
        results.append(result)
        if result.status == "interrupted":
            break
    return results


def write_run_textfiles(
    settings: CleanupSettings, results: Sequence[RunResult], registry: Registry = REGISTRY
) -> list[Path]:
    """After real runs: their node_exporter textfiles (dry runs leave them alone)."""
    if not settings.prom_file:
        return []
    from skybot_cleanup import prometheus  # prometheus_client costs ~10 ms to import: only when used

    outcomes = [
        prometheus.RunOutcome(
            job=registry.task(result.task),
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


def record_failed_start(prom_file: str | None, jobs: Sequence[Job], exit_code: int) -> None:
    """A command that could not even start (an invalid setting): its jobs' textfiles
    still say it ran and failed, keeping their last success."""
    if not prom_file:
        return
    from skybot_cleanup import prometheus

    now = utc_now()
    with contextlib.suppress(OSError):  # the configuration error is what gets reported
        prometheus.write_run_textfiles(
            prom_file,
            [prometheus.RunOutcome(job=job, exit_code=exit_code, succeeded=False, finished=now) for job in jobs],
        )


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


def snapshot(settings: CleanupSettings, registry: Registry = REGISTRY) -> metrics.Snapshot:
    """Take the metrics snapshot and record it in the history."""
    from skybot_cleanup import history, metrics

    now = utc_now()
    with _reading(settings, "metrics") as (engine, target):

        def attempt() -> metrics.Snapshot:
            with db.run_transaction(engine, settings, "metrics", read_only=True) as run:
                return metrics.collect(run.conn, settings, target.schema, now, registry)

        taken = with_retries(settings, attempt, log=get_logger(), reporting=True)
        # After the read transaction: on SQLite an open reader would block this write.
        history.record_snapshot(engine, settings, now, json.dumps(taken.as_dict()))
    return taken


def deliver_snapshot(taken: metrics.Snapshot, prom_file: str | None, pushgateway: str | None) -> None:
    from skybot_cleanup import prometheus

    registry = prometheus.snapshot_registry(taken)
    if prom_file:
        prometheus.write_textfile(Path(prom_file), registry)
    if pushgateway:
        prometheus.push(pushgateway, registry)


def job_status(settings: CleanupSettings, registry: Registry = REGISTRY) -> status.Status:
    from skybot_cleanup import status

    return _read(settings, "status", lambda run, schema, now: status.collect(run.conn, settings, schema, now, registry))


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
            spool.pending(),
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
