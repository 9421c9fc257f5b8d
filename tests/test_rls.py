"""Row-level security is named: it hides rows without an error, so a role it applies to
would delete, and count, nothing forever. `check` calls it an error and says what to run,
a run warns in its log line and its history row, and `metrics` calls the backlog not
measurable instead of 0."""

from __future__ import annotations

import json
import uuid

import pytest
from helpers import as_role, check_findings, events, history_rows, least_privilege_grants, run_cli, seed_tokens


@pytest.fixture
def cleanup_role(postgres, pg_admin):
    """A least-privilege role for the tool, and RLS on "RefreshToken" with a policy for
    the app's role only: the tool's role sees no row of it."""
    role = f"skybot_rls_{uuid.uuid4().hex[:8]}"
    app = f"app_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'CREATE ROLE "{app}"')
    seed_tokens(postgres)
    for statement in least_privilege_grants(role):
        postgres.execute(statement)
    postgres.execute('ALTER TABLE "RefreshToken" ENABLE ROW LEVEL SECURITY')
    postgres.execute(f'CREATE POLICY app_only ON "RefreshToken" TO "{app}" USING (true)')
    yield role, as_role(postgres.url, role)
    postgres.engine.dispose()
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{postgres.database}" WITH (FORCE)')
        conn.exec_driver_sql(f'DROP ROLE "{role}"')
        conn.exec_driver_sql(f'DROP ROLE "{app}"')


def test_check_calls_hidden_rows_an_error_and_gives_both_ways_out(cleanup_role, postgres):
    role, url = cleanup_role
    completed = run_cli("check", "--json", env={"DATABASE_URL": url})
    assert completed.returncode == 1
    finding = next(
        json.loads(line)
        for line in completed.stdout.splitlines()
        if "row-level security" in json.loads(line)["message"]
    )
    assert finding["level"] == "error" and '"public"."RefreshToken"' in finding["message"]
    assert finding["detail"] == [
        f'ALTER ROLE "{role}" BYPASSRLS;',
        f'CREATE POLICY skybot_cleanup ON "public"."RefreshToken" FOR ALL TO "{role}" USING (true);',
    ]
    # The backlog it cannot see is not reported as a number it could trust.
    assert ("ok", "refresh-tokens: 0 rows due") not in check_findings(completed)
    (not_counted,) = [message for _, message in check_findings(completed) if message.startswith("refresh-tokens: due")]
    assert not_counted.startswith('refresh-tokens: due rows not counted: row-level security is on for "public"')


def test_a_run_on_such_a_table_warns_in_its_log_line_and_its_history_row(cleanup_role, postgres):
    _role, url = cleanup_role
    completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": url})
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["rows"] == 0 and 'row-level security is on for "public"."RefreshToken"' in result["warnings"][0]
    assert "row_level_security" in [event["event"] for event in events(completed.stderr)]
    finished = next(event for event in events(completed.stderr) if event["event"] == "run_finished")
    assert finished["warnings"] == result["warnings"]
    row = next(row for row in history_rows(postgres) if row["task"] == "refresh-tokens")
    assert row["warnings"] == result["warnings"][0]
    assert postgres.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}


def test_metrics_marks_that_backlog_not_measurable(cleanup_role, postgres, tmp_path):
    _role, url = cleanup_role
    completed = run_cli("metrics", "--json", env={"DATABASE_URL": url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)})
    assert completed.returncode == 1
    snapshot = json.loads(completed.stdout)
    tasks = {task["name"]: task for task in snapshot["tasks"]}
    for name in ("refresh-tokens", "revoked-tokens"):
        assert tasks[name]["due_rows"] is None and tasks[name]["error"].startswith("backlog not measurable")
    assert tasks["magic-links"]["due_rows"] == 0 and tasks["magic-links"]["error"] is None
    assert snapshot["measures"]["active_sessions"] is None  # a count over the hidden table
    textfile = (tmp_path / "skybot_cleanup_snapshot.prom").read_text()
    assert 'skybot_cleanup_backlog_measured{task="refresh-tokens"} 0.0' in textfile
    assert 'skybot_cleanup_backlog_measured{task="magic-links"} 1.0' in textfile
    assert 'skybot_cleanup_due_rows{task="refresh-tokens"}' not in textfile


def test_a_role_rls_does_not_apply_to_runs_without_a_warning(cleanup_role, postgres, pg_admin):
    role, url = cleanup_role
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'ALTER ROLE "{role}" BYPASSRLS')
    completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": url})
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["rows"], result.get("warnings")) == (0, 2, None)
    assert not any(
        "row-level security" in message
        for _level, message in check_findings(run_cli("check", "--json", env={"DATABASE_URL": url}))
    )


def test_the_tables_owner_is_exempt_unless_it_is_forced(cleanup_role, postgres):
    role, url = cleanup_role
    postgres.execute(f'ALTER TABLE "RefreshToken" OWNER TO "{role}"')
    owner = json.loads(run_cli("refresh-tokens", "--dry-run", "--json", env={"DATABASE_URL": url}).stdout)
    assert (owner["rows"], owner.get("warnings")) == (2, None)
    postgres.execute('ALTER TABLE "RefreshToken" FORCE ROW LEVEL SECURITY')
    forced = json.loads(run_cli("refresh-tokens", "--dry-run", "--json", env={"DATABASE_URL": url}).stdout)
    assert forced["rows"] == 0 and "row-level security" in forced["warnings"][0]
    findings = check_findings(run_cli("check", "--json", env={"DATABASE_URL": url}))
    assert any(level == "error" and "(and forced, so even its owner" in message for level, message in findings)
