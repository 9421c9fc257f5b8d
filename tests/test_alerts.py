"""The monitoring pack: alert rules under promtool, and the dashboard (generate/alerts.py)."""

from __future__ import annotations

import json
import re
import subprocess

import yaml
from helpers import DEPLOY, need, run_cli, seed_operator_data


def test_promtool_checks_the_rules(tmp_path):
    promtool = need("promtool")
    completed = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "monitoring" / "rules.yml")], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert (
        f"SUCCESS: {len(yaml.safe_load((DEPLOY / 'monitoring' / 'rules.yml').read_text())['groups'][0]['rules'])}"
        " rules found" in completed.stdout
    )


def test_promtool_runs_the_rule_unit_tests():
    promtool = need("promtool")
    completed = subprocess.run(
        [promtool, "test", "rules", "rules.test.yml"], capture_output=True, text=True, cwd=DEPLOY / "monitoring"
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "SUCCESS" in completed.stdout


def test_rules_and_dashboard_read_only_series_the_tool_writes(postgres, tmp_path):
    """Every skybot_cleanup_* name the pack queries is one a run or a snapshot writes."""

    seed_operator_data(postgres)
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    assert run_cli("all", env=env).returncode == 0
    assert run_cli("metrics", env=env).returncode == 0
    from prometheus_client.parser import text_string_to_metric_families

    written = {
        sample.name
        for path in tmp_path.glob("*.prom")
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
    }
    pack = "".join(path.read_text() for path in (DEPLOY / "monitoring").iterdir() if path.name != "rules.test.yml")
    queried = set(re.findall(r"skybot_cleanup_[a-z_]+", pack))
    assert queried and queried <= written, queried - written
    dashboard = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Backlog per task (due rows)",
        "Rows deleted per run",
        "Run duration",
        "Time since last success",
        "Active sessions",
        "Table size",
        "Dead tuples",
    } <= titles
