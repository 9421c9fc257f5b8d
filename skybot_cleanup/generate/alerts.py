"""The monitoring pack (deploy/monitoring/): Prometheus alert rules, their promtool unit
tests, and a Grafana dashboard, rendered from the registry like the other deploy files.

Every rule reads series the tool itself writes, and the schedule interval each job
exports, so no rule carries a hand-written interval.
"""

from __future__ import annotations

import json
from typing import Any

from skybot_cleanup import schedule
from skybot_cleanup.errors import ExitCode
from skybot_cleanup.generate import HEADER
from skybot_cleanup.registry import Registry
from skybot_cleanup.settings import DefaultSettings
from skybot_cleanup.textfiles import PREFIX as P

# The alert's threshold is the setting's default: a deployment that changes the setting
# edits the rule too.
CLOCK_SKEW_WARNING_S = DefaultSettings.model_fields["clock_skew_warning_s"].default


def _duration(seconds: float) -> str:
    for unit, length in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"


def rules(registry: Registry) -> dict[str, Any]:
    metrics_interval = schedule.interval(registry.metrics.schedule).total_seconds()
    alerts: list[dict[str, Any]] = [
        {
            "alert": "SkybotCleanupTaskOverdue",
            "expr": f"time() - {P}_last_success_timestamp_seconds > 2 * {P}_schedule_interval_seconds",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "skybot-cleanup {{ $labels.task }} has not succeeded for two intervals",
                "description": "Last success {{ $value | humanizeDuration }} ago. "
                "Run `skybot-cleanup status` and `skybot-cleanup history --task "
                "{{ $labels.task }}` on the host.",
            },
        },
        {
            "alert": "SkybotCleanupTaskFailing",
            # A configuration error has an alert of its own; a skip is no failure.
            "expr": " and ".join(
                f"{P}_last_exit_code != {code}" for code in (ExitCode.OK, ExitCode.CONFIG, ExitCode.SKIPPED)
            ),
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "skybot-cleanup {{ $labels.task }} failed (exit {{ $value }})",
                "description": "Its next run retries. `skybot-cleanup history --task {{ $labels.task }} "
                "--status failed` shows the error.",
            },
        },
        {
            "alert": "SkybotCleanupMisconfigured",
            "expr": f"{P}_last_exit_code == {ExitCode.CONFIG}",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "skybot-cleanup {{ $labels.task }} "
                f"exits {ExitCode.CONFIG}: configuration or privileges",
                "description": "Retrying cannot fix it. Run `skybot-cleanup check` with the job's settings.",
            },
        },
    ]
    for job in registry.jobs:  # the metrics job's run series too
        wait = _duration(2 * schedule.interval(job.schedule).total_seconds())
        alerts.append(
            {
                "alert": "SkybotCleanupLastSuccessMissing",
                "expr": f'absent({P}_last_success_timestamp_seconds{{task="{job.name}"}})',
                "for": wait,
                "labels": {"severity": "warning", "task": job.name},
                "annotations": {
                    "summary": "no last-success series for skybot-cleanup {{ $labels.task }}",
                    "description": "It has never succeeded since its textfile was first written, or "
                    "the textfile is not collected (check SKYBOT_CLEANUP_PROM_FILE and "
                    "node_exporter's --collector.textfile.directory).",
                },
            }
        )
    alerts += [
        {
            "alert": "SkybotCleanupBacklogGrowing",
            "expr": f"{P}_oldest_due_age_seconds > on(task) group_left() "
            f"3 * max by (task) ({P}_schedule_interval_seconds)",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "skybot-cleanup {{ $labels.task }} is not keeping up",
                "description": "The oldest due row has been due for {{ $value | humanizeDuration }}, "
                "three intervals: drain with `skybot-cleanup {{ $labels.task }} "
                "--batch-size 10000 --max-runtime 1800`.",
            },
        },
        {
            "alert": "SkybotCleanupMetricsStale",
            "expr": f"time() - {P}_snapshot_timestamp_seconds > {int(3 * metrics_interval)}",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "skybot-cleanup metrics snapshot is stale",
                "description": "No snapshot for {{ $value | humanizeDuration }}: the metrics job "
                "is failing or not scheduled.",
            },
        },
        {
            "alert": "SkybotCleanupMetricsMissing",
            "expr": f"absent({P}_snapshot_timestamp_seconds)",
            "for": _duration(3 * metrics_interval),
            "labels": {"severity": "warning"},
            "annotations": {"summary": "no skybot-cleanup metrics snapshot is collected"},
        },
        {
            "alert": "SkybotCleanupSnapshotErrors",
            "expr": f"{P}_snapshot_errors > 0",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "skybot-cleanup could not measure some tasks (missing table or column)",
                "description": "Run `skybot-cleanup check`.",
            },
        },
        {
            "alert": "SkybotCleanupBacklogUnmeasured",
            "expr": f"{P}_backlog_measured == 0",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "skybot-cleanup cannot measure the backlog of {{ $labels.task }}",
                "description": "A missing grant, table or column, or row-level security hiding rows: "
                "`skybot-cleanup check` names it and the statement to run.",
            },
        },
        {
            "alert": "SkybotCleanupClockSkew",
            "expr": f"abs({P}_clock_skew_seconds) > {CLOCK_SKEW_WARNING_S:g}",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "the clocks of {{ $labels.instance }} and its database disagree by {{ $value }} s",
                "description": "Runs of {{ $labels.task }} take the earlier clock, so no valid row is deleted, "
                "but due rows wait for the later one. Fix time synchronisation (NTP) on the host or the server.",
            },
        },
        {
            "alert": "SkybotCleanupTextfileScrapeError",
            "expr": "node_textfile_scrape_error > 0",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "node_exporter cannot read a textfile on {{ $labels.instance }}",
                "description": "A .prom file is unreadable or malformed; skybot-cleanup writes its "
                "files 0644 into SKYBOT_CLEANUP_PROM_FILE.",
            },
        },
    ]
    return {"groups": [{"name": "skybot-cleanup", "rules": alerts}]}


def _expected(
    registry: Registry, alert: str, labels: dict[str, str], value: str = "", duration: str = ""
) -> dict[str, Any]:
    """An alert as promtool must see it: labels, and annotations rendered from the rule."""
    rule = next(rule for rule in rules(registry)["groups"][0]["rules"] if rule["alert"] == alert)
    annotations = {}
    for key, template in rule["annotations"].items():
        text = template.replace("{{ $value | humanizeDuration }}", duration).replace("{{ $value }}", value)
        for name, label in labels.items():
            text = text.replace(f"{{{{ $labels.{name} }}}}", label)
        annotations[key] = text
    return {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}


def rule_tests(registry: Registry) -> dict[str, Any]:
    """promtool unit tests: each alert fires on the failure it is for, and only then."""
    hourly = next(task for task in registry.tasks if schedule.interval(task.schedule).total_seconds() == 3600)
    other = next(task for task in registry.tasks if task is not hourly)
    interval = int(schedule.interval(hourly.schedule).total_seconds())
    metrics_interval = int(schedule.interval(registry.metrics.schedule).total_seconds())
    host = {"instance": "db-host:9100", "job": "node"}
    on_host = {**host, "task": hourly.name}
    labels = 'instance="db-host:9100", job="node", task="' + hourly.name + '"'
    other_labels = 'instance="db-host:9100", job="node", task="' + other.name + '"'
    metrics_labels = 'instance="db-host:9100", job="node", task="' + registry.metrics.name + '"'
    steps = 12 * 6  # six hours of 5-minute samples

    def expect(alert: str, alert_labels: dict[str, str], **values: str) -> dict[str, Any]:
        return _expected(registry, alert, alert_labels, **values)

    stale_after = 3 * metrics_interval // 60
    ok, failure, config, skipped = ExitCode.OK, ExitCode.FAILURE, ExitCode.CONFIG, ExitCode.SKIPPED
    tests: list[dict[str, Any]] = [
        {
            "name": "an hourly task that stops succeeding is overdue after two hours, not before",
            "interval": "5m",
            "input_series": [
                # Last success at t=0 (Unix time 0), never again.
                {"series": f"{P}_last_success_timestamp_seconds{{{labels}}}", "values": f"0x{steps}"},
                {"series": f"{P}_schedule_interval_seconds{{{labels}}}", "values": f"{interval}x{steps}"},
                {"series": f"{P}_last_exit_code{{{labels}}}", "values": f"0x{steps}"},
            ],
            "alert_rule_test": [
                {"eval_time": "1h55m", "alertname": "SkybotCleanupTaskOverdue", "exp_alerts": []},
                {
                    "eval_time": "2h5m",
                    "alertname": "SkybotCleanupTaskOverdue",
                    "exp_alerts": [expect("SkybotCleanupTaskOverdue", on_host, duration="2h 5m 0s")],
                },
            ],
        },
        {
            "name": f"exit codes: {failure} is failing, {config} is misconfigured, {skipped} (skipped) and {ok} "
            "are neither",
            "interval": "5m",
            "input_series": [
                {
                    "series": f"{P}_last_exit_code{{{labels}}}",
                    "values": f"{ok} {skipped} {failure} {failure} {config} {config}",
                }
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "SkybotCleanupTaskFailing", "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": "SkybotCleanupTaskFailing",
                    "exp_alerts": [expect("SkybotCleanupTaskFailing", on_host, value=str(failure))],
                },
                {"eval_time": "10m", "alertname": "SkybotCleanupMisconfigured", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "SkybotCleanupTaskFailing", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "SkybotCleanupMisconfigured",
                    "exp_alerts": [expect("SkybotCleanupMisconfigured", on_host)],
                },
            ],
        },
        {
            "name": "a task whose last-success series is missing alerts after two intervals",
            "interval": "5m",
            "input_series": [
                {"series": f"{P}_last_success_timestamp_seconds{{{other_labels}}}", "values": f"0x{steps}"},
                {"series": f"{P}_last_success_timestamp_seconds{{{metrics_labels}}}", "values": f"0x{steps}"},
            ],
            "alert_rule_test": [
                {"eval_time": "1h50m", "alertname": "SkybotCleanupLastSuccessMissing", "exp_alerts": []},
                {
                    "eval_time": "2h5m",
                    "alertname": "SkybotCleanupLastSuccessMissing",
                    "exp_alerts": [expect("SkybotCleanupLastSuccessMissing", {"task": hourly.name})],
                },
            ],
        },
        {
            "name": "a backlog whose oldest row is due for three intervals is not being kept up with",
            "interval": "5m",
            "input_series": [
                # The metrics job's host differs from the cleanup's: matched on the task alone.
                {
                    "series": f'{P}_oldest_due_age_seconds{{instance="metrics-host:9100", job="node", '
                    f'task="{hourly.name}"}}',
                    "values": f"600+300x{steps}",
                },
                {"series": f"{P}_schedule_interval_seconds{{{labels}}}", "values": f"{interval}x{steps}"},
            ],
            "alert_rule_test": [
                {"eval_time": "2h", "alertname": "SkybotCleanupBacklogGrowing", "exp_alerts": []},
                {
                    "eval_time": "3h",
                    "alertname": "SkybotCleanupBacklogGrowing",
                    "exp_alerts": [
                        expect(
                            "SkybotCleanupBacklogGrowing",
                            {"instance": "metrics-host:9100", "job": "node", "task": hourly.name},
                            duration="3h 10m 0s",
                        )
                    ],
                },
            ],
        },
        {
            "name": "the metrics snapshot goes stale after three of its intervals",
            "interval": "5m",
            "input_series": [
                {
                    "series": f'{P}_snapshot_timestamp_seconds{{instance="db-host:9100", job="node"}}',
                    "values": f"0x{steps}",
                },
                {"series": f'{P}_snapshot_errors{{instance="db-host:9100", job="node"}}', "values": "0 0 1"},
                {"series": 'node_textfile_scrape_error{instance="db-host:9100", job="node"}', "values": f"0 1x{steps}"},
            ],
            "alert_rule_test": [
                {"eval_time": f"{stale_after}m", "alertname": "SkybotCleanupMetricsStale", "exp_alerts": []},
                {
                    "eval_time": f"{stale_after + 5}m",
                    "alertname": "SkybotCleanupMetricsStale",
                    "exp_alerts": [expect("SkybotCleanupMetricsStale", host, duration=f"{stale_after + 5}m 0s")],
                },
                {"eval_time": "5m", "alertname": "SkybotCleanupSnapshotErrors", "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": "SkybotCleanupSnapshotErrors",
                    "exp_alerts": [expect("SkybotCleanupSnapshotErrors", host)],
                },
                {"eval_time": "10m", "alertname": "SkybotCleanupTextfileScrapeError", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "SkybotCleanupTextfileScrapeError",
                    "exp_alerts": [expect("SkybotCleanupTextfileScrapeError", host)],
                },
                {"eval_time": "10m", "alertname": "SkybotCleanupMetricsMissing", "exp_alerts": []},
            ],
        },
        {
            "name": "a task whose backlog the snapshot could not measure",
            "interval": "5m",
            "input_series": [{"series": f"{P}_backlog_measured{{{labels}}}", "values": "1 1 0"}],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "SkybotCleanupBacklogUnmeasured", "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": "SkybotCleanupBacklogUnmeasured",
                    "exp_alerts": [expect("SkybotCleanupBacklogUnmeasured", on_host)],
                },
            ],
        },
        {
            "name": "a host clock ahead of (or behind) the database's beyond the threshold",
            "interval": "5m",
            "input_series": [
                {"series": f"{P}_clock_skew_seconds{{{labels}}}", "values": "0.2 -0.5 3600"},
                {"series": f"{P}_clock_skew_seconds{{{other_labels}}}", "values": "-7200 -7200 -7200"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "5m",
                    "alertname": "SkybotCleanupClockSkew",
                    "exp_alerts": [
                        expect("SkybotCleanupClockSkew", {**host, "task": other.name}, value="7200"),
                    ],
                },
                {
                    "eval_time": "10m",
                    "alertname": "SkybotCleanupClockSkew",
                    "exp_alerts": [
                        expect("SkybotCleanupClockSkew", on_host, value="3600"),
                        expect("SkybotCleanupClockSkew", {**host, "task": other.name}, value="7200"),
                    ],
                },
            ],
        },
    ]
    return {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}


def dashboard(registry: Registry) -> dict[str, Any]:
    datasource = {"type": "prometheus", "uid": "${datasource}"}

    def panel(
        panel_id: int, title: str, expr: str, legend: str, unit: str, x: int, y: int, description: str
    ) -> dict[str, Any]:
        return {
            "id": panel_id,
            "type": "timeseries",
            "title": title,
            "description": description,
            "datasource": datasource,
            "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": "A", "datasource": datasource, "expr": expr, "legendFormat": legend}],
        }

    panels = [
        panel(
            1,
            "Backlog per task (due rows)",
            f"max by (task) ({P}_due_rows)",
            "{{task}}",
            "short",
            0,
            0,
            "Rows the next run of each task would delete (an estimate past 10,000).",
        ),
        panel(
            2,
            "Rows deleted per run",
            f"max by (task) ({P}_last_rows)",
            "{{task}}",
            "short",
            12,
            0,
            "Rows the last run of each task deleted.",
        ),
        panel(
            3,
            "Run duration",
            f"max by (task) ({P}_last_duration_seconds)",
            "{{task}}",
            "s",
            0,
            8,
            "How long each task's last run took.",
        ),
        panel(
            4,
            "Time since last success",
            f"time() - max by (task) ({P}_last_success_timestamp_seconds)",
            "{{task}}",
            "s",
            12,
            8,
            "Alerts fire past two scheduled intervals.",
        ),
        panel(
            5,
            "Active sessions",
            f"max({P}_active_sessions)",
            "sessions",
            "short",
            0,
            16,
            "Refresh tokens neither revoked nor expired.",
        ),
        panel(
            6,
            "Oldest due row",
            f"max by (task) ({P}_oldest_due_age_seconds)",
            "{{task}}",
            "s",
            12,
            16,
            "How long the oldest due row of each task has been due.",
        ),
        panel(
            7,
            "Table size",
            f"max by (table) ({P}_table_size_bytes)",
            "{{table}}",
            "bytes",
            0,
            24,
            "Size on disk, indexes and TOAST included. DELETE does not shrink it.",
        ),
        panel(
            8,
            "Dead tuples",
            f"max by (table) ({P}_table_dead_tuples)",
            "{{table}}",
            "short",
            12,
            24,
            "Deleted rows waiting for (auto)vacuum.",
        ),
    ]
    return {
        "title": "skybot-cleanup",
        "uid": "skybot-cleanup",
        "description": HEADER,
        "tags": ["skybot", "postgresql", "cleanup"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "1m",
        "time": {"from": "now-24h", "to": "now"},
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
        },
        "panels": panels,
    }


def _yaml(document: dict[str, Any]) -> str:
    """Block-style YAML for this pack's plain data (no YAML library needed at run time):
    every string double-quoted, which YAML reads exactly as JSON writes it."""

    def scalar(value: Any) -> str:
        return json.dumps(value)

    def emit(value: Any, indent: str) -> list[str]:
        lines: list[str] = []
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, (dict, list)) and item:
                    lines.append(f"{indent}{key}:")
                    lines += emit(item, indent + "  ")
                else:
                    lines.append(f"{indent}{key}: {scalar(item) if not isinstance(item, (dict, list)) else item}")
        else:
            for item in value:
                nested = emit(item, indent + "  ") if isinstance(item, (dict, list)) else [scalar(item)]
                first = nested[0].lstrip() if isinstance(item, (dict, list)) else nested[0]
                lines.append(f"{indent}- {first}")
                lines += nested[1:]
        return lines

    return f"# {HEADER}.\n" + "\n".join(emit(document, "")) + "\n"


def files(registry: Registry) -> dict[str, str]:
    return {
        "monitoring/rules.yml": _yaml(rules(registry)),
        "monitoring/rules.test.yml": _yaml(rule_tests(registry)),
        "monitoring/grafana-dashboard.json": json.dumps(dashboard(registry), indent=2) + "\n",
    }
