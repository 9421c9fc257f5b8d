"""The `skybot-cleanup` command line: thin verbs over skybot_cleanup.cleanup.

Heavy imports (SQLAlchemy, psycopg) happen inside the verbs, so `--help` and
`--version` stay fast for a command that cron starts every few minutes.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from skybot_cleanup import __version__
from skybot_cleanup.errors import EXIT_CONFIG, ConfigError, Interrupted, worst_exit_code
from skybot_cleanup.tasks import TASKS, Task

app = typer.Typer(
    name="skybot-cleanup",
    help="Scheduled, transactional housekeeping for the SkyBot Inbox database.\n\n"
    "Exit codes: 0 ok (also nothing to delete), 1 failure, 2 usage or configuration error, "
    "75 skipped (another run holds the task's lock), 128+N stopped by signal N.",
    no_args_is_help=True,
    add_completion=False,
    # Tracebacks with locals would print the settings, database URL included.
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
)

DryRun = Annotated[bool, typer.Option("--dry-run", help="Count what would be deleted; change nothing.")]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print one JSON object per task on stdout.")]
BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, metavar="N", show_default=False,
    help="Delete in committed batches of at most N rows (default: one transaction).")]
MaxRows = Annotated[Optional[int], typer.Option(
    "--max-rows", min=1, metavar="N", show_default=False,
    help="Stop after N rows; the result says how many due rows remain.")]
MaxRuntime = Annotated[Optional[float], typer.Option(
    "--max-runtime", min=0.001, metavar="SECONDS", show_default=False,
    help="Stop between batches once the run has lasted this long.")]
SleepMs = Annotated[Optional[int], typer.Option(
    "--sleep-ms", min=0, metavar="MS", show_default=False, help="Pause between batches.")]
PromFile = Annotated[Optional[str], typer.Option(
    "--prom-file", metavar="PATH", show_default=False,
    help="Write node_exporter textfile metrics ({task} in PATH is replaced; a directory gets one file per task).")]
NoHistory = Annotated[bool, typer.Option("--no-history", help="Do not record this run in the history tables.")]
DatabaseUrl = Annotated[
    Optional[str],
    typer.Option("--database-url", metavar="URL", show_default=False,
                 help="Overrides SKYBOT_CLEANUP_DATABASE_URL and DATABASE_URL."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"skybot-cleanup {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Each cleanup command is one idempotent run."""


def _fail(message: str, exit_code: int = EXIT_CONFIG) -> typer.Exit:
    typer.echo(f"skybot-cleanup: error: {message}", err=True)
    return typer.Exit(exit_code)


def _load(**overrides):
    from skybot_cleanup.logs import configure_logging
    from skybot_cleanup.settings import load_settings

    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _report(result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    elif result.status == "ok":
        verb = "would delete" if result.dry_run else "deleted"
        batches = "" if result.batches is None else f" in {result.batches} batches, {result.remaining} due rows remain"
        stopped = f" (stopped by {result.stopped_by})" if result.stopped_by else ""
        typer.echo(f"{result.task}: {verb} {result.rows} rows{batches}{stopped} "
                   f"(cutoff {result.cutoff}, {result.duration_ms} ms)")
    if result.status != "ok":
        typer.echo(f"skybot-cleanup: {result.task} {result.status}: {result.error}", err=True)


def run_tasks(tasks: tuple[Task, ...], *, dry_run: bool, as_json: bool, **overrides) -> int:
    from skybot_cleanup.cleanup import database_target, run_task

    settings = _load(**overrides)
    try:
        database_target(settings)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    install_signal_handlers()
    results = []
    try:
        for task in tasks:
            with progress_bar(task.name, enabled=settings.batch_size is not None and not dry_run) as on_progress:
                result = run_task(settings, task, dry_run=dry_run, on_progress=on_progress)
            _report(result, as_json)
            results.append(result)
            if result.status == "interrupted":
                break
    except Interrupted as exc:  # a signal between runs, or while one was being recorded
        typer.echo(f"skybot-cleanup: interrupted by signal {exc.signum}", err=True)
        return exc.exit_code
    if settings.prom_file:
        from skybot_cleanup.metrics import write_run_metrics

        try:
            write_run_metrics(settings, results)
        except OSError as exc:
            typer.echo(f"skybot-cleanup: error: cannot write {settings.prom_file}: {exc.strerror}", err=True)
            return worst_exit_code([*(r.exit_code for r in results), 1])
    return worst_exit_code(result.exit_code for result in results)


def install_signal_handlers() -> None:
    """SIGTERM (Render, systemd, Kubernetes) and SIGINT end the run cleanly.

    Raising Interrupted mid-statement makes psycopg cancel the query, so the open
    transaction rolls back; batches already committed stay committed.
    """
    import signal

    def interrupt(signum, _frame):
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, interrupt)


@contextmanager
def progress_bar(label: str, *, enabled: bool):
    """A progress bar on a terminal for batched runs; nothing otherwise (logs carry progress)."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn(), transient=True) as bar:
        bar_task = bar.add_task(label, total=None, rate="-")
        started = time.monotonic()

        def update(rows: int, total: int | None) -> None:
            elapsed = time.monotonic() - started
            bar.update(bar_task, completed=rows, total=total, rate=f"{rows / elapsed:,.0f}" if elapsed else "-")

        yield update


def _task_command(tasks: tuple[Task, ...]):
    def command(dry_run: DryRun = False, as_json: JsonOutput = False, database_url: DatabaseUrl = None,
                batch_size: BatchSize = None, max_rows: MaxRows = None, max_runtime: MaxRuntime = None,
                sleep_ms: SleepMs = None, prom_file: PromFile = None, no_history: NoHistory = False) -> None:
        raise typer.Exit(run_tasks(tasks, dry_run=dry_run, as_json=as_json, database_url=database_url,
                                   batch_size=batch_size, max_rows=max_rows, max_runtime_s=max_runtime,
                                   sleep_ms=sleep_ms, prom_file=prom_file, history=False if no_history else None))

    return command


for _task in TASKS:
    app.command(_task.name, help=f"{_task.summary}\n\nDeletes {_task.rule}.")(_task_command((_task,)))
app.command("all", help="Run every cleanup task in turn, each in its own transaction (or batches).")(
    _task_command(TASKS))


@contextmanager
def _database(label: str, **overrides):
    """Settings and an engine for the reporting commands; any failure is one line."""
    from skybot_cleanup import db
    from skybot_cleanup.cleanup import database_target
    from skybot_cleanup.errors import classify

    settings = _load(**overrides)
    target = engine = None
    try:
        target = database_target(settings)
        engine = db.create_engine(target, settings, label)
        yield settings, engine, target.schema
    except Exception as exc:
        failure = classify(exc, secrets=(target.password,) if target and target.password else ())
        raise _fail(f"{label} failed: {failure.message}", failure.exit_code) from None
    finally:
        if engine is not None:
            engine.dispose()


def _read(label: str, work, **overrides):
    """work(conn, settings, schema, now) in a read-only transaction."""
    from skybot_cleanup import db
    from skybot_cleanup.cleanup import utc_now

    with _database(label, **overrides) as (settings, engine, schema):
        with db.transaction(engine, settings, label=label, read_only=True) as conn:
            return work(conn, settings, schema, utc_now())


@app.command("metrics")
def metrics_command(
    as_json: JsonOutput = False, database_url: DatabaseUrl = None,
    prom_file: Annotated[Optional[Path], typer.Option("--prom-file", metavar="PATH", show_default=False,
                         help="Write the node_exporter textfile format (atomically).")] = None,
    pushgateway: Annotated[Optional[str], typer.Option("--pushgateway", metavar="URL", show_default=False,
                           help="Push to a Prometheus Pushgateway.")] = None,
    no_history: NoHistory = False,
) -> None:
    """Measure backlogs, active sessions and table health; delete nothing."""
    from skybot_cleanup import db, history, metrics
    from skybot_cleanup.cleanup import utc_now
    from skybot_cleanup.logs import get_logger

    with _database("metrics", database_url=database_url, history=False if no_history else None) as (
            settings, engine, schema):
        now = utc_now()
        with db.transaction(engine, settings, label="metrics", read_only=True) as conn:
            snapshot = metrics.collect(conn, settings, schema, now)
        # After the read transaction: on SQLite an open reader would block this write.
        history.record(engine, settings, snapshot=snapshot, now=now)
    get_logger().info("metrics", **{k: v for k, v in snapshot.items() if k != "taken_at"})
    if as_json:
        typer.echo(json.dumps(snapshot))
    elif sys.stdout.isatty():  # every 5 minutes under cron, the log event is enough
        typer.echo(metrics.render_table(snapshot))
    registry = metrics.prometheus_registry(snapshot)
    textfile = str(prom_file) if prom_file else metrics.textfile_path(settings.prom_file, "metrics")
    try:
        if textfile:
            metrics.write_textfile(textfile, registry)
        if pushgateway:
            metrics.push(pushgateway, registry)
    except Exception as exc:  # a monitoring sink down is worth exit 1, not a traceback
        raise _fail(f"metrics were collected but not delivered: {type(exc).__name__}: {exc}", 1) from None


@app.command("status")
def status_command(as_json: JsonOutput = False, database_url: DatabaseUrl = None) -> None:
    """Per task: last success and failure, next run, rows due; exit 1 if any is OVERDUE or FAILING."""
    from skybot_cleanup.status import render_table, task_statuses

    statuses = _read("status", task_statuses, database_url=database_url)
    if as_json:
        for status in statuses:
            typer.echo(json.dumps(status))
    else:
        typer.echo(render_table(statuses))
    raise typer.Exit(0 if all(status["health"] == "OK" for status in statuses) else 1)


@app.command("check")
def check_command(as_json: JsonOutput = False, database_url: DatabaseUrl = None) -> None:
    """Pre-flight: connection, tables, column types, indexes, privileges, backlogs. Exit 1 on errors."""
    from skybot_cleanup.check import run_checks

    findings = _read("check", run_checks, database_url=database_url)
    for finding in findings:
        if as_json:
            typer.echo(json.dumps({"level": finding.level, "message": finding.message}))
        else:
            typer.echo(f"{finding.level.upper():<8}{finding.message}")
    raise typer.Exit(1 if any(finding.level == "error" for finding in findings) else 0)


@app.command("schedule")
def schedule_command(
    fmt: Annotated[str, typer.Option("--format", metavar="crontab|systemd|render|kubernetes",
                                     help="Which scheduler's files to render.")],
    output: Annotated[Optional[Path], typer.Option("--output", metavar="DIR", show_default=False,
                                                   help="Write the files under DIR (default: print them).")] = None,
    exec_path: Annotated[Optional[str], typer.Option("--exec", metavar="PATH", show_default=False,
                                                     help="Absolute path of the installed skybot-cleanup.")] = None,
) -> None:
    """Render deployment files from the task registry: every schedule, UTC."""
    from skybot_cleanup.deploy import FORMATS, render_files, write_files

    if fmt not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    files = render_files(fmt, exec_path)
    if output is None:
        for name, text in files.items():
            typer.echo(f"# ---- {name}\n{text}" if len(files) > 1 else text, nl=False)
        return
    for path in write_files(files, output):
        typer.echo(f"wrote {path}")


@app.command()
def demo(
    path: Annotated[Path, typer.Option("--path", help="SQLite file to (re)create.")] = Path("skybot-demo.db"),
    as_json: JsonOutput = False,
) -> None:
    """Seed the app's tables in a SQLite file and run every task on it: no server needed."""
    from skybot_cleanup.cleanup import run_task, utc_now
    from skybot_cleanup.demo import create_demo_database, ids_by_table

    now = utc_now()
    try:
        url = create_demo_database(path, now)
    except Exception as exc:  # an unwritable path, mostly
        raise _fail(f"cannot create the demo database at {path}: {exc}", 1) from None
    settings = _load(database_url=url, log_level="warning")
    if not as_json:
        counts = ", ".join(f"{len(ids)} {table}" for table, ids in ids_by_table(url).items())
        typer.echo(f"Demo database {path} seeded with {counts} rows.\n")
    exit_codes = []
    for task in TASKS:
        before = ids_by_table(url)
        result = run_task(settings, task, now=now)
        after = ids_by_table(url)
        removed = sorted(set().union(*(before[t] - after[t] for t in before)))
        exit_codes.append(result.exit_code)
        if as_json:
            typer.echo(json.dumps({**result.as_dict(), "removed": removed}))
            continue
        typer.echo(f"{task.name}: deleted {result.rows} ({task.rule})")
        for row_id in removed:
            typer.echo(f"    - {row_id}")
        if result.status != "ok":
            typer.echo(f"    {result.status}: {result.error}")
    if not as_json:
        remaining = "\n".join(f"    {table}: {', '.join(sorted(ids))}" for table, ids in ids_by_table(url).items())
        typer.echo(f"\nStill there (live, or revoked within the audit window):\n{remaining}")
        typer.echo(f"\nTry it yourself: skybot-cleanup refresh-tokens --dry-run --database-url {url}")
    raise typer.Exit(worst_exit_code(exit_codes))


def main() -> None:
    app()
