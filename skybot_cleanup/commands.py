"""What each command does, as plain functions of the settings (the CLI only parses,
renders and exits). Usable from Python as they are."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from skybot_cleanup import db
from skybot_cleanup.clock import utc_now
from skybot_cleanup.cutoff import RunTime, run_time
from skybot_cleanup.errors import EXIT_OK, CleanupError, ConfigError, Failure, classify, redact, worst_exit_code
from skybot_cleanup.logs import get_logger
from skybot_cleanup.registry import REGISTRY, Job, Registry, Task
from skybot_cleanup.results import RunResult, build_result
from skybot_cleanup.retry import with_retries
from skybot_cleanup.run import ProgressCallback, run_task
from skybot_cleanup.settings import DefaultSettings, Settings
from skybot_cleanup.vocabulary import RunStatus

PING_TIMEOUT_DEFAULT_S = float(DefaultSettings.model_fields["ping_timeout_s"].default)

if TYPE_CHECKING:  # the reporting modules load only for the commands that use them
    from skybot_cleanup import history, metrics, status
    from skybot_cleanup.check import Finding

T = TypeVar("T")
ProgressFactory = Callable[[Task], AbstractContextManager[ProgressCallback | None]]


# -- cleanups ---------------------------------------------------------------------------------


def cleanup(
    settings: Settings, tasks: Sequence[Task], *, dry_run: bool = False, progress: ProgressFactory | None = None
) -> Iterator[RunResult]:
    """Run tasks in turn, each in its own transaction (or batches), yielding each result
    as it ends; stop after a run that a signal interrupted or followed."""
    from skybot_cleanup import signals

    for task in tasks:
        if signals.pending() is not None:  # a stop signal since the last run's work ended
            return
        with progress(task) if progress else nullcontext() as on_progress:
            result = run_task(settings, task, dry_run=dry_run, on_progress=on_progress)
        yield result
        if result.status == RunStatus.INTERRUPTED or result.signal is not None:
            return


def write_run_textfiles(prom_file: str | None, results: Sequence[RunResult], registry: Registry = REGISTRY) -> None:
    """After real runs: their node_exporter textfiles. A path that cannot be written is a
    warning: the run's result stands (alerts notice a series that stops moving)."""
    if not prom_file:
        return
    from skybot_cleanup import textfiles  # prometheus_client costs ~10 ms to import: only when used

    for path, why in textfiles.write_run_textfiles(prom_file, results, {job.name: job for job in registry.jobs}):
        get_logger().warning("textfile_not_written", path=str(path), error=redact(why))


def record_failed_start(
    salvaged: dict[str, str | None], jobs: Sequence[Job], error: ConfigError, *, dry_run: bool = False
) -> None:
    """A command that could not even start (an invalid setting or URL) still leaves its
    traces, with what can be read of the settings: each job's textfile says it ran and
    failed (keeping its last success), the heartbeat gets the exit code, and the history
    gets a failed run, spooled until a run reaches the database. Never raises."""
    import time
    import uuid

    from skybot_cleanup.heartbeat import check_url, ping_once
    from skybot_cleanup.recording import ping_body

    now, started = utc_now(), time.monotonic()
    failure = classify(error)
    results = [
        build_result(job.name, str(uuid.uuid4()), started_at=now, clock_started=started, failure=failure)
        for job in jobs
    ]
    for result in results:
        result.dry_run = dry_run
    write_run_textfiles(salvaged.get("prom_file"), results)
    ping_url = salvaged.get("ping_url")
    timeout = PING_TIMEOUT_DEFAULT_S
    with contextlib.suppress(ValueError, TypeError):
        timeout = min(float(salvaged.get("ping_timeout_s") or timeout), PING_TIMEOUT_DEFAULT_S)
    if ping_url and not dry_run and check_url(ping_url) is None:
        for result in results:
            ping_once(ping_url, result.task, str(result.exit_code), result.run_id, timeout, body=ping_body(result))
    if (salvaged.get("history") or "true").lower() in ("0", "false", "no", "off"):
        return
    try:
        identity = db.parse_database_url(salvaged.get("database_url"), salvaged.get("schema_name")).identity
    except Exception:  # the URL itself may be what is wrong: no database to record it for
        return
    from skybot_cleanup import history

    spool = history.spool_for(salvaged.get("state_dir"))
    for result in results:
        with contextlib.suppress(OSError):
            history.spool_row(spool, identity, history.history_row(result))


# -- reporting commands -----------------------------------------------------------------------


@contextmanager
def _reading(settings: Settings, label: str) -> Iterator[tuple[Any, db.DatabaseTarget]]:
    target = settings.database_target()
    engine = db.create_engine(target, settings.session(), label)
    try:
        yield engine, target
    finally:
        engine.dispose()


def clock_of(run: db.RunConnection) -> RunTime:
    """The clocks, read in the transaction: reports judge by the server's, which every
    record of the tool is stamped with."""
    return run_time(server=run.server_now, host=run.host_now)


def _read(
    settings: Settings,
    label: str,
    work: Callable[[db.RunConnection, str | None, RunTime], T],
    *,
    read_only: bool = True,
) -> T:
    """work(run, schema, clocks) in a bounded read-only transaction, retried when
    transient. Its counts go through the walk columns' indexes, as the runs' do."""
    with _reading(settings, label) as (engine, target):

        def attempt() -> T:
            with db.run_transaction(
                engine, settings.session(), label, read_only=read_only, planner=db.INDEX_WALK_PLANNER
            ) as run:
                return work(run, target.schema, clock_of(run))

        return with_retries(settings, attempt, log=get_logger(), reporting=True)


@dataclass
class MetricsRun:
    result: RunResult  # the metrics job as a run, recorded and pinged like a cleanup
    snapshot: metrics.Snapshot | None


def metrics_job(
    settings: Settings,
    snapshot_file: str | None = None,
    pushgateway: str | None = None,
    registry: Registry = REGISTRY,
) -> MetricsRun:
    """The metrics job, as `skybot-cleanup metrics` runs it: the snapshot (to
    `snapshot_file`, else beside the runs' textfiles as skybot_cleanup_snapshot.prom),
    its `metrics` log event, and the job's own run series."""
    if snapshot_file is None and settings.prom_file:
        from skybot_cleanup import textfiles

        snapshot_file = str(textfiles.textfile_path(settings.prom_file, "snapshot"))
    job = take_metrics(settings, snapshot_file, pushgateway, registry)
    if job.snapshot is not None:
        taken = job.snapshot.as_dict()
        get_logger().info("metrics", **{key: value for key, value in taken.items() if key != "taken_at"})
    write_run_textfiles(settings.prom_file, [job.result])
    return job


def take_metrics(
    settings: Settings,
    snapshot_file: str | None = None,
    pushgateway: str | None = None,
    registry: Registry = REGISTRY,
) -> MetricsRun:
    """Take the snapshot, record it, deliver it; the job's own outcome is recorded like a
    cleanup run's (history row, heartbeat, textfile), failed when a task could not be
    measured or the snapshot could not be delivered. One connection for all of it: the
    snapshot and the job's row are written together as it ends."""
    from skybot_cleanup import metrics
    from skybot_cleanup.recording import RecordedRun

    recorded = RecordedRun(settings, registry.metrics.name)
    taken: list[metrics.Snapshot] = []
    clocks: list[RunTime] = []

    def attempt() -> metrics.Snapshot:
        assert recorded.engine is not None and recorded.target is not None
        recorded.close_connection()  # a retry's connection replaces the last one
        conn = recorded.conn = recorded.engine.connect()
        run = db.RunConnection(conn, settings.session(), recorded.job, read_only=True, planner=db.INDEX_WALK_PLANNER)
        run.begin()
        try:
            clocks[:] = [clock_of(run)]
            recorded.read_clocks(run)
            snapshot = metrics.take_snapshot(run, settings, recorded.target.schema, clocks[0].record_now, registry)
            # Before the record is written: on SQLite an open reader would block that write.
            run.commit()
            return snapshot
        finally:
            run.rollback()

    def work() -> None:
        snapshot = with_retries(settings, attempt, log=recorded.log, reporting=True)
        taken.append(snapshot)
        recorded.snapshot = (clocks[0].record_now, json.dumps(snapshot.as_dict()))
        recorded.history_refused = snapshot.history_refused
        try:
            deliver_snapshot(snapshot, snapshot_file, pushgateway)
        except Exception as exc:  # a monitoring sink down: the job failed, and says which sink
            raise CleanupError(f"metrics were collected but not delivered: {type(exc).__name__}: {exc}") from None
        if snapshot.history_refused:
            raise ConfigError(snapshot.history_refused)
        if snapshot.errors:
            raise CleanupError("; ".join(snapshot.errors))

    result = recorded.execute(work, lambda: {"clock_skew_s": clocks[0].skew_s} if clocks else {})
    return MetricsRun(result, taken[0] if taken else None)


def deliver_snapshot(taken: metrics.Snapshot, prom_file: str | None, pushgateway: str | None) -> None:
    from skybot_cleanup import textfiles

    registry = textfiles.snapshot_registry(taken)
    if prom_file:
        textfiles.write_textfile(Path(prom_file), registry)
    if pushgateway:
        textfiles.push(pushgateway, registry)


def job_status(settings: Settings, registry: Registry = REGISTRY) -> status.Status:
    """Every job's health. If the history does not yet know when the tool first saw this
    database, it is recorded now (a fresh install is PENDING for a while, not forever);
    if the history cannot be read or written at all, the jobs are UNKNOWN."""
    from skybot_cleanup import health, history, status

    with _reading(settings, "status") as (engine, target):
        spooled = history.spool_for(settings.state_dir).entries(target.identity)

        def read(unknown: str | None) -> status.Status:
            def attempt() -> status.Status:
                with db.run_transaction(
                    engine, settings.session(), "status", read_only=True, planner=db.INDEX_WALK_PLANNER
                ) as run:
                    now = clock_of(run).record_now
                    judged = health.judge(run, settings, target.schema, now, registry, spooled=spooled, unknown=unknown)
                    return status.render(judged, settings, now)

            return with_retries(settings, attempt, log=get_logger(), reporting=True)

        if not settings.history:
            return read("run history is off (SKYBOT_CLEANUP_HISTORY=false)")
        seen = read(None)
        if (seen.history_available and seen.first_seen is not None) or seen.history_refused:
            return seen  # a refused history is never written to: nothing to record there
        problem = history.ensure_seen(engine, settings)
        return read(
            None if problem is None else f"no run history ({problem}): `skybot-cleanup check` says how to fix it"
        )


def run_check(settings: Settings, registry: Registry = REGISTRY) -> list[Finding]:
    from skybot_cleanup.check import run_checks

    return _read(settings, "check", lambda run, schema, clocks: run_checks(run, settings, schema, clocks, registry))


@dataclass
class HistoryView:
    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    pending_local: int  # runs waiting in the state directory for the database


def run_history(settings: Settings, query: history.HistoryQuery) -> HistoryView:
    from skybot_cleanup import history

    def work(run: db.RunConnection, _schema: str | None, _clocks: RunTime) -> HistoryView:
        spool = history.spool_for(settings.state_dir)
        return HistoryView(
            list(history.list_runs(run.conn, settings, query)),
            history.summarize(run.conn, settings, query),
            len(spool.entries(settings.database_target().identity)),
        )

    return _read(settings, "history", work)


def describe_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """`skybot-cleanup config`: the version, every setting, its value (secrets masked), its
    source, and what is wrong with one that validated but cannot work. Raises ConfigError."""
    from skybot_cleanup import __version__
    from skybot_cleanup import settings as settings_module
    from skybot_cleanup.heartbeat import check_url

    loaded = settings_module.load(overrides)
    ping = loaded.settings.ping_url
    problem = check_url(ping.get_secret_value()) if ping else None
    described = settings_module.describe_settings(loaded, {"ping_url": f"unusable: {problem}"} if problem else None)
    return {"version": __version__, **described}


def schedule_files(fmt: str, *, exec_path: str | None = None, image: str | None = None) -> dict[str, str]:
    """`skybot-cleanup schedule`: the deployment or monitoring files of a format, by
    path. Raises ConfigError for an unknown format or a bad --exec or --image."""
    from skybot_cleanup.generate.deploy import FORMATS, render_files

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    try:
        return render_files(fmt, exec_path=exec_path, image=image)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def write_schedule_files(files: dict[str, str], output: Path) -> list[Path]:
    """Write them under `output`: ConfigError where a link could redirect a write,
    CleanupError where the directory cannot take them."""
    from skybot_cleanup.generate.deploy import write_files
    from skybot_cleanup.localfiles import UnsafePath

    try:
        return write_files(files, output)
    except UnsafePath as exc:
        raise ConfigError(f"refusing to write under {output}: {exc.strerror}") from None
    except OSError as exc:
        raise CleanupError(f"cannot write under {output}: {exc.strerror}") from None


@dataclass
class Demo:
    shown: str  # the database, as the output names it
    seeded: dict[str, set[str]]
    steps: list[Any]  # demo.DemoStep, each task's run on it
    invocation: str  # how the newcomer ran this command (for the command to try next)
    database: Any
    settings: Settings

    def left(self) -> dict[str, set[str]]:
        from skybot_cleanup import demo

        return demo.ids_by_table(self.database, self.settings)


def demo(settings: Settings, url: str, *, shown: str | None = None) -> Demo:
    """`skybot-cleanup demo`: the app's tables created and seeded in `url` (a SQLite file,
    or an empty PostgreSQL database), then every task run on them. Raises ConfigError
    (a database with tables already), CleanupError (one that cannot be made)."""
    from skybot_cleanup import demo as demo_module
    from skybot_cleanup.clock import utc_now

    now = utc_now()
    try:
        database = demo_module.create(url, now, settings)
    except ConfigError:
        raise
    except Exception as exc:  # an unwritable path, an unreachable server
        message = failure_of(exc, settings).message
        raise CleanupError(f"cannot create the demo database: {message}") from None
    seeded = demo_module.ids_by_table(database, settings)
    steps = list(demo_module.run(database, settings, now))
    return Demo(
        shown=shown or db.parse_database_url(url).display,
        seeded=seeded,
        steps=steps,
        invocation=demo_module.invocation(),
        database=database,
        settings=settings,
    )


def failure_of(exc: BaseException, settings: Settings | None = None) -> Failure:
    secrets: tuple[str, ...] = settings.secrets() if settings else ()
    try:
        if settings is not None:
            secrets += settings.database_target().secrets
    except Exception:  # noqa: S110 - the URL itself may be what is wrong
        pass
    return classify(exc, secrets)


def exit_code_of(results: Sequence[RunResult]) -> int:
    return worst_exit_code(result.exit_code for result in results) if results else EXIT_OK
