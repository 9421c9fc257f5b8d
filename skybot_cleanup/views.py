"""Every rendering of the tool's output, text for people and JSON for scripts, in one place.

Functions return lines (or one text); the CLI prints them. Nothing here touches a
database or decides an exit code.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from skybot_cleanup.clock import human_age, iso_utc
from skybot_cleanup.errors import redact
from skybot_cleanup.results import RunResult
from skybot_cleanup.vocabulary import RunStatus

if TYPE_CHECKING:
    from skybot_cleanup import metrics
    from skybot_cleanup import status as status_module
    from skybot_cleanup.check import Finding
    from skybot_cleanup.commands import HistoryView
    from skybot_cleanup.demo import DemoStep


def as_json(value: Any) -> str:
    return json.dumps(value)


# -- cleanup runs -------------------------------------------------------------------------------


def result_line(result: RunResult) -> str:
    """The summary of a successful run for a person."""
    verb = "would delete" if result.dry_run else "deleted"
    at_least = "at least " if result.remaining_exact is False else ""
    batches = (
        "" if result.batches is None else f" in {result.batches} batches, {at_least}{result.remaining} due rows remain"
    )
    stopped = f" (stopped by {result.stopped_by})" if result.stopped_by else ""
    return (
        f"{result.task}: {verb} {result.rows} rows{batches}{stopped} (cutoff {result.cutoff}, {result.duration_ms} ms)"
    )


def failure_line(result: RunResult) -> str:
    return f"{result.task} {result.status}: {result.error}"


# -- metrics ------------------------------------------------------------------------------------


def snapshot_table(snapshot: metrics.Snapshot) -> str:
    """The snapshot for a person at a terminal."""
    measures = "   ".join(
        f"{name.replace('_', ' ')} {'-' if value is None else f'{value:,}'}"
        for name, value in snapshot.measures.items()
    )
    lines = [
        f"snapshot {snapshot.taken_at}  database {_size(snapshot.database_size_bytes)}, "
        f"SELECT 1 in {snapshot.latency_seconds * 1000:.1f} ms",
        measures,
        "",
        f"{'task':<18}{'due rows':>12}{'oldest due':>12}  {'last success':<26}{'last rows':>10}  overdue",
    ]
    for task in snapshot.tasks:
        if task.error:
            lines.append(f"{task.name:<18}{'ERROR':>12}  {task.error}")
            continue
        due = f"{'~' if task.due_rows_estimated else ''}{task.due_rows or 0:,}"
        last_rows = "-" if task.last_rows is None else f"{task.last_rows:,}"
        overdue = "-" if task.overdue is None else ("YES" if task.overdue else "no")
        lines.append(
            f"{task.name:<18}{due:>12}{human_age(task.oldest_due_age_seconds):>12}  "
            f"{task.last_success_at or 'never':<26}{last_rows:>10}  {overdue}"
        )
    lines += ["", f"{'table':<18}{'rows':>14}{'size':>10}{'dead':>10}  last vacuum / analyze"]
    for table in snapshot.tables:
        if table.error:
            lines.append(f"{table.name:<18}{'ERROR':>14}  {table.error}")
            continue
        rows = f"{'~' if table.rows_estimated else ''}{table.rows or 0:,}"
        dead = "-" if table.dead_tuples is None else f"{table.dead_tuples:,}"
        lines.append(
            f"{table.name:<18}{rows:>14}{_size(table.size_bytes):>10}{dead:>10}  "
            f"{table.last_vacuum or 'never'} / {table.last_analyze or 'never'}"
        )
    return "\n".join(lines)


def _size(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


# -- status -------------------------------------------------------------------------------------


def escaped(row: dict[str, Any]) -> dict[str, Any]:
    """Every text of a row read from the history, as the logs show text: secrets redacted
    and control characters escaped. Whoever can write the history could have put a
    password or a terminal's escape sequence in any field."""
    return {name: redact(value) if isinstance(value, str) else value for name, value in row.items()}


def status_json(status: status_module.Status) -> list[str]:
    return [as_json(escaped(job.as_dict())) for job in status.jobs]


def status_table(status: status_module.Status) -> str:
    header = (
        f"{'job':<18}{'schedule':<13}{'health':<9}{'last success':<26}{'rows':>8}  "
        f"{'next run':<22}{'due now':>9}  last failure"
    )
    lines = [header]
    for job in (dataclasses.replace(each, **escaped(each.as_dict())) for each in status.jobs):
        if job.error:
            failure = job.error
        elif job.last_failure_at:
            failure = f"{job.last_failure_at} {job.last_failure_error}"
        else:
            failure = "-"
        rows = "-" if job.last_success_rows is None else f"{job.last_success_rows:,}"
        due = "-" if job.due_rows is None else f"{'~' if job.due_rows_estimated else ''}{job.due_rows:,}"
        lines.append(
            f"{job.task:<18}{job.schedule:<13}{job.health:<9}{job.last_success_at or 'never':<26}"
            f"{rows:>8}  {job.next_run_at:<22}{due:>9}  {failure}"
        )
    lines.append(
        f"(PENDING: never run yet, and not due before its first scheduled time plus a grace of "
        f"{status.grace_minutes} min, SKYBOT_CLEANUP_GRACE_MINUTES; UNKNOWN: no run history to judge by)"
    )
    if status.role_beyond_need:
        lines.append(
            f"(the role holds more than a cleanup needs: {'; '.join(status.role_beyond_need)}; "
            "`skybot-cleanup check` prints a least-privilege role)"
        )
    return "\n".join(lines)


# -- check --------------------------------------------------------------------------------------


def findings_lines(findings: Sequence[Finding], json_output: bool) -> list[str]:
    if json_output:
        return [as_json(finding.as_dict()) for finding in findings]
    lines = []
    for finding in findings:
        lines.append(f"{finding.level.upper():<8}{finding.message}")
        lines += [f"{'':<8}    {line}" for line in finding.detail]
    return lines


# -- history ------------------------------------------------------------------------------------


def history_lines(view: HistoryView, json_output: bool) -> list[str]:
    if json_output:
        lines = [
            as_json(escaped({**run, "cutoff": iso_utc(run["cutoff"]), "finished_at": iso_utc(run["finished_at"])}))
            for run in view.runs
        ]
        lines += [
            as_json(
                {
                    "summary": line["task"],
                    "runs": line["runs"],
                    "failures": line["failures"],
                    "rows_deleted": line["rows_deleted"],
                    "last_run_at": iso_utc(line["last"]),
                }
            )
            for line in view.summary
        ]
        if view.pending_local:
            lines.append(as_json({"pending_local": view.pending_local}))
        return lines
    lines = [f"{'finished (UTC)':<25}{'task':<18}{'status':<12}{'rows':>10}{'ms':>9}  {'host':<16}{'run id':<38}error"]
    for run in map(escaped, view.runs):
        status_text = run["status"] + (" (dry)" if run["dry_run"] else "")
        error = f"{run['error_class']}: {run['error']}" if run["error"] else ""
        lines.append(
            f"{iso_utc(run['finished_at']) or '':<25}{run['task']:<18}{status_text:<12}{run['rows']:>10,}"
            f"{run['duration_ms']:>9,}  {run['host'][:15]:<16}{run['run_id']:<38}{error}"
        )
    lines.append("")
    lines += [
        f"{line['task']}: {line['runs']} runs, {line['failures']} failed, {line['rows_deleted']:,} rows deleted"
        for line in view.summary
    ]
    if view.pending_local:
        runs = "1 run waits" if view.pending_local == 1 else f"{view.pending_local} runs wait"
        lines.append(f"({runs} in the state directory until a run reaches this database)")
    return lines


# -- config -------------------------------------------------------------------------------------


def config_lines(view: dict[str, Any], json_output: bool) -> list[str]:
    if json_output:
        return [as_json(view)]
    width = max(len(entry["variable"]) for entry in view["settings"])
    lines = [f"skybot-cleanup {view['version']}", f"settings file: {view['settings_file'] or '(none)'}"]
    lines += [
        f"{entry['variable']:<{width}}  {entry['value']!s:<40}  {entry['source']}"
        + (f"  ERROR: {entry['error']}" if entry.get("error") else "")
        for entry in view["settings"]
    ]
    lines += [f"unknown: {entry['variable']} (did you mean {entry['closest'] or '?'})" for entry in view["unknown"]]
    return lines


# -- demo ---------------------------------------------------------------------------------------


def demo_seeded(shown: str, ids: dict[str, set[str]]) -> str:
    counts = ", ".join(f"{len(table_ids)} {table}" for table, table_ids in ids.items())
    return f"Demo database {shown} seeded with {counts} rows.\n"


def demo_step_lines(step: DemoStep, json_output: bool) -> list[str]:
    if json_output:
        return [as_json({**step.result.as_dict(), "removed": step.removed})]
    lines = [f"{step.result.task}: deleted {step.result.rows} ({step.rule})"]
    lines += [f"    - {row_id}" for row_id in step.removed]
    if step.result.status != RunStatus.OK:
        lines.append(f"    {step.result.status}: {step.result.error}")
    return lines


def demo_left(ids: dict[str, set[str]], example_url: str | None, command: str = "skybot-cleanup") -> list[str]:
    """What the demo left, and how to try the tool on it with `command` (the way this one
    ran): the URL in the environment (a command line is visible to every local user), or,
    for a server, in a file."""
    remaining = "\n".join(f"    {table}: {', '.join(sorted(table_ids))}" for table, table_ids in ids.items())
    try_it = (
        f"DATABASE_URL={shlex.quote(example_url)} {command} refresh-tokens --dry-run"
        if example_url
        else "put the database URL in a file only you can read, then: "
        f"DATABASE_URL_FILE=<that file> {command} refresh-tokens --dry-run"
    )
    return [f"\nStill there (live, or revoked within the audit window):\n{remaining}", f"\nTry it yourself: {try_it}"]


# -- schedule -----------------------------------------------------------------------------------


def generated_files(files: dict[str, str]) -> Iterable[str]:
    for name, text in files.items():
        yield f"# ---- {name}\n{text}" if len(files) > 1 else text
