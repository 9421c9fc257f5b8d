"""The `skybot-cleanup` command line: parse, call skybot_cleanup.commands, render, exit.

Heavy imports (SQLAlchemy, psycopg, prometheus_client) happen inside the verbs, so
`--help`, `--version` and `schedule` stay fast.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer

from skybot_cleanup import __version__
from skybot_cleanup.errors import (
    CleanupError,
    ConfigError,
    ExitCode,
    Interrupted,
    exit_code_for_signal,
    exit_codes_help,
    worst_exit_code,
)
from skybot_cleanup.registry import REGISTRY, Job, Task
from skybot_cleanup.schedule import describe
from skybot_cleanup.settings import ENV_PREFIX, column_field, env_name, table_field
from skybot_cleanup.vocabulary import Level, RunStatus

if TYPE_CHECKING:
    from skybot_cleanup.results import RunResult
    from skybot_cleanup.run import ProgressCallback
    from skybot_cleanup.settings import Settings

EXIT_CODES = exit_codes_help()

app = typer.Typer(
    name="skybot-cleanup",
    help="Scheduled, transactional housekeeping for the SkyBot Inbox database: one command per task, each run "
    "one idempotent, locked, bounded run.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    # Plain help: flags show no value placeholder (rich's panels print "<bool>" for them).
    rich_markup_mode=None,
    # Tracebacks with locals would print the settings, database URL included.
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
)


def _flag(name: str, help_text: str) -> Any:
    # metavar="": a flag takes no value, and the help should not suggest one.
    return typer.Option(name, help=help_text, metavar="")


DryRun = Annotated[bool, _flag("--dry-run", "Count what would be deleted; change nothing (takes no lock).")]
JsonOutput = Annotated[bool, _flag("--json", "Print one JSON object per result on stdout.")]
Quiet = Annotated[bool, _flag("--quiet", "Print nothing on stdout (the logs on stderr say everything).")]
NoHistory = Annotated[bool, _flag("--no-history", "Do not record this run in the history tables.")]
BatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size",
        min=1,
        max=1_000_000,
        metavar="N",
        show_default=False,
        help="Rows per committed batch (default 10000).",
    ),
]
SingleTransaction = Annotated[
    bool,
    _flag(
        "--single-transaction",
        "Delete every due row in one transaction, not in batches: all or nothing. Rows the app holds are "
        "skipped (counted in remaining) as in batches, but an app write to a row the run has deleted waits "
        "until the whole run commits.",
    ),
]
MaxRows = Annotated[
    Optional[int],
    typer.Option(
        "--max-rows",
        min=1,
        metavar="N",
        show_default=False,
        help="Stop after N rows; the result says how many due rows remain.",
    ),
]
MaxRuntime = Annotated[
    Optional[float],
    typer.Option(
        "--max-runtime",
        min=0.001,
        max=604_800,
        metavar="SECONDS",
        show_default=False,
        help="Stop between batches once the run has lasted this long.",
    ),
]
SleepMs = Annotated[
    Optional[int],
    typer.Option("--sleep-ms", min=0, max=600_000, metavar="MS", show_default=False, help="Pause between batches."),
]
MaxReplicaLag = Annotated[
    Optional[float],
    typer.Option(
        "--max-replica-lag",
        min=0,
        max=86_400,
        metavar="SECONDS",
        show_default=False,
        help="Keep every streaming standby's replay lag under this (default 10; 0: off): between batches the "
        "run waits while a standby is behind, and paces itself to the slowest one's replay speed.",
    ),
]
PromFile = Annotated[
    Optional[str],
    typer.Option(
        "--prom-file",
        metavar="PATH",
        show_default=False,
        help="Write node_exporter textfiles: a directory (one file per task) or a path with {task}.",
    ),
]
DatabaseUrl = Annotated[
    Optional[str],
    typer.Option(
        "--database-url",
        metavar="URL",
        show_default=False,
        help="Overrides SKYBOT_CLEANUP_DATABASE_URL and DATABASE_URL. Other local users see a command line: "
        "give a URL with a password in a file (--database-url-file) or the environment instead.",
    ),
]
DatabaseUrlFile = Annotated[
    Optional[str],
    typer.Option(
        "--database-url-file",
        metavar="PATH",
        show_default=False,
        help="Read the database URL from this file (as DATABASE_URL_FILE does: the secret-file convention).",
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"skybot-cleanup {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Show the version and exit.")
    ] = False,
) -> None:
    """Each cleanup command is one idempotent run."""
    reset_process_state()


# The modules that keep state for one command (a warning given once, the secrets to
# redact, the log format, a noted signal): a new command in the same process starts
# afresh. Only those loaded have any.
STATEFUL_MODULES = ("errors", "logs", "signals", "heartbeat", "history", "spool")


def reset_process_state() -> None:
    for name in STATEFUL_MODULES:
        module = sys.modules.get(f"skybot_cleanup.{name}")
        if module is not None:
            module.reset()


def _fail(message: str, exit_code: int = ExitCode.CONFIG, *, logged: bool = False) -> NoReturn:
    from skybot_cleanup.logs import report_failure

    report_failure(message, logged=logged, exit_code=exit_code)
    raise typer.Exit(exit_code)


def _load(jobs: Sequence[Job] = (), dry_run: bool = False, **overrides: Any) -> Settings:
    """Settings, with logging configured and every load-time warning given; a bad
    setting is one line, exit 2, and (for jobs) a trace in their textfiles, heartbeat
    and history."""
    from skybot_cleanup import heartbeat, logs, settings

    try:
        loaded = settings.load(overrides)
    except ConfigError as exc:
        _failed_start(jobs, overrides, exc, dry_run=dry_run)
    logs.configure_logging(loaded.settings.log_format, loaded.settings.log_level, loaded.settings.syslog_prefix)
    log = logs.get_logger()
    for variable, closest in loaded.unknown:
        log.warning(
            "unknown_setting",
            variable=variable,
            hint=f"did you mean {closest}?" if closest else "no setting has a similar name",
        )
    for warning in loaded.warnings:
        log.warning(warning.event, **warning.fields)
    heartbeat.warn_if_invalid(loaded.settings)
    return loaded.settings


def _failed_start(jobs: Sequence[Job], overrides: dict[str, Any], exc: ConfigError, *, dry_run: bool) -> NoReturn:
    from skybot_cleanup.commands import record_failed_start
    from skybot_cleanup.settings import salvage

    if jobs:
        record_failed_start(salvage(overrides), jobs, exc, dry_run=dry_run)
    _fail(f"error: {exc}")


def _echo(lines: Iterable[str]) -> None:
    for line in lines:
        typer.echo(line)


def _report(result: RunResult, as_json: bool, quiet: bool) -> None:
    from skybot_cleanup import views

    if as_json:
        typer.echo(views.as_json(result.as_dict()))
    elif result.status == RunStatus.OK and not quiet:
        typer.echo(views.result_line(result))
    if result.status != RunStatus.OK:
        from skybot_cleanup.logs import report_failure

        report_failure(views.failure_line(result), logged=True)


def run_tasks(tasks: Sequence[Task], *, dry_run: bool, as_json: bool, quiet: bool = False, **overrides: Any) -> int:
    from skybot_cleanup import commands

    settings = _load(tasks, dry_run=dry_run, **overrides)
    try:
        settings.database_target()
    except ConfigError as exc:
        _failed_start(tasks, overrides, exc, dry_run=dry_run)
    from skybot_cleanup.logs import report_failure

    install_signal_handlers()
    results: list[RunResult] = []
    codes: list[int] = []
    try:
        for result in commands.cleanup(
            settings,
            tasks,
            dry_run=dry_run,
            progress=lambda task: progress_bar(task.name, enabled=not (settings.single_transaction or dry_run)),
        ):
            results.append(result)
            _report(result, as_json, quiet)
    except Interrupted as exc:  # a signal before the first run began
        report_failure(f"interrupted by signal {exc.signum}")
        codes.append(exc.exit_code)
    from skybot_cleanup import signals

    stopped, unrun = signals.pending(), [task.name for task in tasks[len(results) :]]
    if stopped is not None and unrun and results:
        # A run's own exit code is the one its record holds; the tasks a signal kept from
        # running make the command's.
        report_failure(f"interrupted by signal {stopped}: {', '.join(unrun)} not run")
        codes.append(exit_code_for_signal(stopped))
    # Whatever stopped the command, the runs that ended have their textfiles.
    commands.write_run_textfiles(settings.prom_file, results)
    return worst_exit_code([commands.exit_code_of(results), *codes])


def install_signal_handlers() -> None:
    """SIGTERM (Render, systemd, Kubernetes) and SIGINT end a run's work cleanly, and
    never its record (skybot_cleanup.signals)."""
    from skybot_cleanup import signals

    signals.install()


@contextmanager
def progress_bar(label: str, *, enabled: bool) -> Iterator[ProgressCallback | None]:
    """A progress bar on a terminal for batched runs; nothing otherwise (logs carry progress)."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} rows/s"),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        bar_task = bar.add_task(label, total=None, rate="-")
        started = time.monotonic()

        def update(rows: int, total: int | None) -> None:
            elapsed = time.monotonic() - started
            bar.update(bar_task, completed=rows, total=total, rate=f"{rows / elapsed:,.0f}" if elapsed else "-")

        yield update


def _task_help(task: Task) -> str:
    spec = task.table
    names = [env_name(table_field(spec))] + [env_name(column_field(spec, role)) for role in spec.roles]
    retention = ""
    if task.retention:
        retention = (
            f" Retention: {ENV_PREFIX}{task.retention.setting.upper()} (default {task.retention.default_days} days)."
        )
    return (
        f"{task.summary}\n\nDeletes {task.rule}.\n\n"
        f"Schedule: {describe(task.schedule)} (cron {task.schedule}).{retention} Table and columns: "
        f"{', '.join(names)}. Batches: {ENV_PREFIX}BATCH_SIZE, MAX_ROWS, MAX_RUNTIME_S, SLEEP_MS; or "
        f"{ENV_PREFIX}SINGLE_TRANSACTION.\n\n" + EXIT_CODES
    )


def _task_command(tasks: tuple[Task, ...]) -> Any:
    def command(
        dry_run: DryRun = False,
        as_json: JsonOutput = False,
        quiet: Quiet = False,
        database_url: DatabaseUrl = None,
        database_url_file: DatabaseUrlFile = None,
        batch_size: BatchSize = None,
        single_transaction: SingleTransaction = False,
        max_rows: MaxRows = None,
        max_runtime: MaxRuntime = None,
        sleep_ms: SleepMs = None,
        max_replica_lag: MaxReplicaLag = None,
        prom_file: PromFile = None,
        no_history: NoHistory = False,
    ) -> None:
        raise typer.Exit(
            run_tasks(
                tasks,
                dry_run=dry_run,
                as_json=as_json,
                quiet=quiet,
                database_url=database_url,
                database_url_file=database_url_file,
                batch_size=batch_size,
                single_transaction=True if single_transaction else None,
                max_rows=max_rows,
                max_runtime_s=max_runtime,
                sleep_ms=sleep_ms,
                max_replica_lag_s=max_replica_lag,
                prom_file=prom_file,
                history=False if no_history else None,
            )
        )

    return command


for _task in REGISTRY.tasks:
    app.command(_task.name, help=_task_help(_task), short_help=_task.summary)(_task_command((_task,)))
app.command("all", help="Run every cleanup task in turn, each in its own transaction (or batches).\n\n" + EXIT_CODES)(
    _task_command(REGISTRY.tasks)
)


def _guarded(label: str, settings: Settings, work: Any) -> Any:
    """A reporting command's database work: any failure is one line and its exit code."""
    from skybot_cleanup.commands import failure_of

    try:
        return work()
    except Interrupted as exc:
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:
        from skybot_cleanup.errors import print_traceback_when_debugging

        print_traceback_when_debugging(exc)
        failure = failure_of(exc, settings)
        _fail(f"{label} failed: {failure.message}", failure.exit_code)


@app.command(
    "metrics",
    help="Measure backlogs, active sessions and table health; delete nothing. "
    f"Exit {ExitCode.FAILURE} if a task could not be measured.",
)
def metrics_command(
    as_json: Annotated[
        bool,
        _flag(
            "--json",
            "Print the snapshot as one JSON object: measures (active sessions, "
            "live magic links, idempotency keys in progress and stuck), per task its due "
            "rows and oldest due age, per table rows, size, dead tuples, and errors.",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    database_url_file: DatabaseUrlFile = None,
    prom_file: Annotated[
        Optional[str],
        typer.Option(
            "--prom-file",
            metavar="PATH",
            show_default=False,
            help="Write the snapshot's node_exporter textfile to exactly PATH (default: under "
            "SKYBOT_CLEANUP_PROM_FILE, as skybot_cleanup_snapshot.prom; the job's own run series go to "
            "skybot_cleanup_metrics.prom there).",
        ),
    ] = None,
    pushgateway: Annotated[
        Optional[str],
        typer.Option("--pushgateway", metavar="URL", show_default=False, help="Push to a Prometheus Pushgateway."),
    ] = None,
    no_history: NoHistory = False,
    quiet: Quiet = False,
) -> None:
    from skybot_cleanup import commands, views
    from skybot_cleanup.logs import report_failure

    settings = _load(
        (REGISTRY.metrics,),
        database_url=database_url,
        database_url_file=database_url_file,
        history=False if no_history else None,
    )
    install_signal_handlers()
    run = commands.metrics_job(settings, prom_file, pushgateway)
    if run.snapshot is not None:
        if as_json:
            typer.echo(views.as_json(run.snapshot.as_dict()))
        elif sys.stdout.isatty() and not quiet:  # every 5 minutes under cron, the log event is enough
            typer.echo(views.snapshot_table(run.snapshot))
    if run.result.status != RunStatus.OK:
        report_failure(views.failure_line(run.result), logged=True)
    # The job's exit code is the one its record holds, whatever signal came after its work.
    raise typer.Exit(run.result.exit_code)


@app.command(
    "status",
    help="Per job: health, last success and failure, next run, rows due. "
    f"Exit {ExitCode.FAILURE} if any is OVERDUE, FAILING or UNKNOWN.",
)
def status_command(
    as_json: Annotated[
        bool,
        _flag(
            "--json",
            "One JSON object per job: health (OK, PENDING, OVERDUE, FAILING, UNKNOWN), "
            "last success and failure, next run, rows due.",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    database_url_file: DatabaseUrlFile = None,
) -> None:
    from skybot_cleanup import commands, views
    from skybot_cleanup.logs import get_logger

    settings = _load(database_url=database_url, database_url_file=database_url_file)
    if not settings.history:
        get_logger().warning(
            "history_disabled", hint="SKYBOT_CLEANUP_HISTORY is off: no run is known, so every job shows UNKNOWN"
        )
    status = _guarded("status", settings, lambda: commands.job_status(settings))
    _echo(views.status_json(status) if as_json else [views.status_table(status)])
    raise typer.Exit(ExitCode.OK if status.healthy else ExitCode.FAILURE)


@app.command(
    "check",
    help="Pre-flight: server, tables, column types, privileges, indexes, backlogs, history. "
    f"Exit {ExitCode.FAILURE} on errors.",
)
def check_command(
    as_json: Annotated[
        bool,
        _flag(
            "--json",
            "One JSON object per finding: level (ok, info, warning, error), "
            "message, and detail lines (statements to run).",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    database_url_file: DatabaseUrlFile = None,
) -> None:
    from skybot_cleanup import commands, views

    settings = _load(database_url=database_url, database_url_file=database_url_file)
    findings = _guarded("check", settings, lambda: commands.run_check(settings))
    _echo(views.findings_lines(findings, as_json))
    raise typer.Exit(ExitCode.FAILURE if any(finding.level == Level.ERROR for finding in findings) else ExitCode.OK)


@app.command("history")
def history_command(
    task: Annotated[
        Optional[str], typer.Option("--task", metavar="NAME", show_default=False, help="Only this task (or metrics).")
    ] = None,
    status: Annotated[
        Optional[str],
        typer.Option(
            "--status", metavar="ok|failed|skipped|interrupted", show_default=False, help="Only runs that ended so."
        ),
    ] = None,
    since: Annotated[
        Optional[str],
        typer.Option(
            "--since",
            metavar="DURATION|TIMESTAMP",
            show_default=False,
            help="Only runs since then: 6h, 7d, or 2026-11-01T00:00Z.",
        ),
    ] = None,
    until: Annotated[
        Optional[str],
        typer.Option(
            "--until",
            metavar="DURATION|TIMESTAMP",
            show_default=False,
            help="Only runs before then: 6h (ago), or 2026-11-02T00:00Z.",
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, metavar="N", help="At most N runs.")] = 50,
    as_json: Annotated[
        bool,
        _flag(
            "--json",
            "One JSON object per run (time, task, status, rows, duration, host, "
            "run id, error), then one per task summary.",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    database_url_file: DatabaseUrlFile = None,
) -> None:
    """Recorded runs, newest first, and a per-task summary: runs, failures, rows deleted."""
    from skybot_cleanup import commands, views
    from skybot_cleanup.clock import parse_moment, utc_now
    from skybot_cleanup.history import HistoryQuery

    known = [job.name for job in REGISTRY.jobs]
    if task is not None and task not in known:
        _fail(f"error: --task must be one of {', '.join(known)}, not {task!r}")
    if status is not None and status not in set(RunStatus):
        _fail(f"error: --status must be ok, failed, skipped or interrupted, not {status!r}")
    moments = {}
    for option, text in (("--since", since), ("--until", until)):
        try:
            moments[option] = parse_moment(text, utc_now()) if text else None
        except ValueError:
            _fail(f"error: {option} takes a duration (90m, 6h, 7d) or an ISO time from 1970 on, not {text!r}")
    settings = _load(database_url=database_url, database_url_file=database_url_file)
    query = HistoryQuery(task=task, status=status, since=moments["--since"], until=moments["--until"], limit=limit)
    view = _guarded("history", settings, lambda: commands.run_history(settings, query))
    _echo(views.history_lines(view, as_json))


@app.command("config")
def config_command(
    as_json: Annotated[
        bool, _flag("--json", "One JSON object: settings (variable, value, source) and unknown variables.")
    ] = False,
    database_url: DatabaseUrl = None,
    database_url_file: DatabaseUrlFile = None,
) -> None:
    """The version, and every setting in effect and where it came from; secrets redacted."""
    from skybot_cleanup import commands, views

    try:
        view = commands.describe_config({"database_url": database_url, "database_url_file": database_url_file})
    except ConfigError as exc:
        _fail(f"error: {exc}")
    _echo(views.config_lines(view, as_json))


@app.command("schedule")
def schedule_command(
    fmt: Annotated[
        str,
        typer.Option("--format", metavar="crontab|systemd|render|kubernetes|monitoring", help="Which files to render."),
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", metavar="DIR", show_default=False, help="Write the files under DIR (default: print them)."
        ),
    ] = None,
    exec_path: Annotated[
        Optional[str],
        typer.Option(
            "--exec",
            metavar="PATH",
            show_default=False,
            help="The installed skybot-cleanup: an absolute path, or a bare command name on the scheduler's PATH.",
        ),
    ] = None,
    image: Annotated[
        Optional[str],
        typer.Option("--image", metavar="REF", show_default=False, help="Container image of the Kubernetes CronJobs."),
    ] = None,
) -> None:
    """Render deployment and monitoring files from the registry: every schedule, UTC."""
    from skybot_cleanup import commands, views

    try:
        files = commands.schedule_files(fmt, exec_path=exec_path, image=image)
        if output is None:
            for text in views.generated_files(files):
                typer.echo(text, nl=False)
            return
        written = commands.write_schedule_files(files, output)
    except CleanupError as exc:
        _fail(f"error: {exc}", exc.exit_code)
    for path in written:
        typer.echo(f"wrote {path}")


@app.command("demo")
def demo_command(
    path: Annotated[Path, typer.Option("--path", help="SQLite file to (re)create.")] = Path("skybot-demo.db"),
    database_url: Annotated[
        Optional[str],
        typer.Option(
            "--database-url",
            metavar="URL",
            show_default=False,
            help="An EMPTY PostgreSQL database (or ?schema=) to create the app's tables in, seed and clean; "
            "refused if it has tables.",
        ),
    ] = None,
    as_json: JsonOutput = False,
) -> None:
    """Seed the app's tables and run every task on them: a SQLite file by default, no server needed."""
    from skybot_cleanup import commands, views

    url = database_url or f"sqlite:///{path.resolve()}"
    settings = _load(database_url=url, log_level="warning")
    try:
        demo = commands.demo(settings, url, shown=None if database_url else str(path))
    except CleanupError as exc:
        _fail(f"error: {exc}", exc.exit_code)
    if not as_json:
        typer.echo(views.demo_seeded(demo.shown, demo.seeded))
    exit_codes = []
    for step in demo.steps:
        exit_codes.append(step.result.exit_code)
        _echo(views.demo_step_lines(step, as_json))
    if not as_json:
        _echo(views.demo_left(demo.left(), None if database_url else url, demo.invocation))
    raise typer.Exit(worst_exit_code(exit_codes))


def main() -> None:
    """The console script: any failure nobody expected is still one line and exit 1."""
    try:
        app()
    except Exception as exc:
        from skybot_cleanup.errors import debugging, redact
        from skybot_cleanup.logs import report_failure

        if debugging():
            raise
        report_failure(
            f"unexpected error: {type(exc).__name__}: {redact(str(exc))} (set {ENV_PREFIX}DEBUG=1 for a traceback)"
        )
        sys.exit(ExitCode.FAILURE)
