"""The run history: every run recorded, pruned by retention, listed by `history`."""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa
from helpers import (
    DAY,
    HOUR,
    SECRET,
    TASK_NAMES,
    env_for,
    events,
    history_rows,
    invoke,
    least_privilege_grants,
    put_history,
    run_cli,
    seed_due_and_live,
    seed_operator_data,
    start_cli,
)

from skybot_cleanup.clock import utc_now
from skybot_cleanup.db import parse_database_url
from skybot_cleanup.history import history_tables
from skybot_cleanup.spool import PENDING_RUNS


def test_tasks_started_together_on_a_fresh_database_all_reach_the_history(postgres):
    """The first runs create the history tables: serialised, not racing in the catalog."""
    seed_due_and_live(postgres, due=3)
    names = ["idempotency-keys", "refresh-tokens", "magic-links", "revoked-tokens"]
    processes = [start_cli(name, env=env_for(postgres)) for name in names]
    for process in processes:
        _out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "history_unavailable" not in err
    runs = history_tables("postgresql", "skybot_cleanup").runs
    with postgres.engine.connect() as conn:
        assert sorted(conn.scalars(sa.select(runs.c.task))) == sorted(names)


@pytest.mark.parametrize(
    ("options", "tasks"),
    [
        (("--since", "2026-11-01T00:00Z"), ["refresh-tokens", "magic-links"]),
        (("--since", "3h"), ["refresh-tokens"]),
        (("--until", "3h"), ["magic-links"]),
        (("--since", "1970-01-01T00:00Z", "--until", "9999-12-31T00:00Z"), ["refresh-tokens", "magic-links"]),
        (("--since", "5h", "--until", "1h"), []),
    ],
)
def test_history_since_and_until_take_a_timestamp_or_a_duration(sqlite, options, tasks):
    put_history(sqlite, ("magic-links", "ok", 6 * HOUR), ("refresh-tokens", "ok", 0 * HOUR))
    result = invoke("history", *options, "--json", env={"DATABASE_URL": sqlite.url})
    assert result.exit_code == 0, result.output
    assert [line["task"] for line in map(json.loads, result.stdout.splitlines()) if "run_id" in line] == tasks


@pytest.mark.parametrize("option", ["--since", "--until"])
@pytest.mark.parametrize("text", ["99999999999d", "1900-01-01T00:00Z", "yesterday", "-5h"])
def test_history_refuses_a_moment_out_of_range_or_unreadable_with_exit_2(sqlite, option, text):
    """A far-future duration once overflowed into a traceback and exit 1."""
    completed = run_cli(
        "history", option, text, env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_LOG_FORMAT": "console"}
    )
    assert (completed.returncode, completed.stdout, completed.stderr) == (
        2,
        "",
        f"skybot-cleanup: error: {option} takes a duration (90m, 6h, 7d) or an ISO time from 1970 on, not {text!r}\n",
    )


def test_history_output_escapes_control_characters_and_hides_secrets_from_recorded_errors(sqlite):
    """Whoever could write the history or the spool must not drive the operator's terminal."""
    put_history(sqlite, ("refresh-tokens", "failed", HOUR), error=f"boom\x1b[2J\x07 at hc-ping.com/{SECRET}/x")
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PING_URL": f"https://hc-ping.com/{SECRET}/{{task}}"}
    table = run_cli("history", env=env)
    assert table.returncode == 0, table.stderr
    assert "OperationalError: boom\\x1b[2J\\x07 at hc-ping.com/***/x" in table.stdout
    as_json = run_cli("history", "--json", env=env)
    runs = [line for line in map(json.loads, as_json.stdout.splitlines()) if "run_id" in line]
    assert [run["error"] for run in runs] == ["boom\\x1b[2J\\x07 at hc-ping.com/***/x"]
    for output in (table.stdout + table.stderr, as_json.stdout + as_json.stderr):
        assert SECRET not in output and "\x1b" not in output and "\x07" not in output


def test_history_records_every_kind_of_run(backend):
    seed_operator_data(backend)
    env = {"DATABASE_URL": backend.url}
    assert invoke("refresh-tokens", "--dry-run", env=env).exit_code == 0
    assert invoke("refresh-tokens", env=env).exit_code == 0
    assert invoke("magic-links", env={**env, "SKYBOT_CLEANUP_MAGIC_LINK_USED_COLUMN": "usedd"}).exit_code == 2
    assert invoke("idempotency-keys", "--no-history", env=env).exit_code == 0
    rows = history_rows(backend)
    assert [(r["task"], r["status"], r["dry_run"], r["rows"], r["exit_code"]) for r in rows] == [
        ("refresh-tokens", "ok", True, 2, 0),
        ("refresh-tokens", "ok", False, 2, 0),
        ("magic-links", "failed", False, 0, 2),
    ]
    assert rows[2]["error_class"] == "ConfigError" and "usedd" in rows[2]["error"]
    assert len({r["run_id"] for r in rows}) == 3 and all(r["host"] for r in rows)


def test_history_is_pruned_by_retention(sqlite):
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_HISTORY_RETENTION_DAYS": "30"}
    assert invoke("refresh-tokens", env=env).exit_code == 0
    runs = history_tables("sqlite", "skybot_cleanup").runs
    old = {**history_rows(sqlite)[0], "id": None, "run_id": "old", "finished_at": utc_now() - 31 * DAY}
    young = {**old, "run_id": "young", "finished_at": utc_now() - 29 * DAY}
    with sqlite.engine.begin() as conn:
        conn.execute(runs.insert(), [{k: v for k, v in row.items() if k != "id"} for row in (old, young)])
    assert invoke("refresh-tokens", env=env).exit_code == 0
    assert {r["run_id"] for r in history_rows(sqlite)} >= {"young"}
    assert "old" not in {r["run_id"] for r in history_rows(sqlite)}
    assert len(history_rows(sqlite)) == 3


def test_an_unreachable_database_run_reaches_the_history_with_the_next_run(postgres, tmp_path):
    """Spooled in the state directory, then recorded with its real time and error."""
    seed_operator_data(postgres)
    state = tmp_path / "state-dir"
    down = run_cli(
        "refresh-tokens",
        env={
            "DATABASE_URL": "postgresql://skybot@127.0.0.1:1/app",
            "SKYBOT_CLEANUP_STATE_DIR": str(state),
            "SKYBOT_CLEANUP_MAX_RETRIES": "0",
        },
    )
    assert down.returncode == 1
    spooled = list((state / PENDING_RUNS).glob("*.json"))
    assert len(spooled) == 1
    # The database the failed run was meant for is back (same host, same database name).
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)}
    # Re-point the spooled record at this test database, as if it had been down.
    record = json.loads(spooled[0].read_text())

    record["database"] = parse_database_url(postgres.url).identity
    spooled[0].write_text(json.dumps(record))
    up = run_cli("refresh-tokens", env=env)
    assert up.returncode == 0, up.stderr
    assert list((state / PENDING_RUNS).glob("*")) == []
    rows = history_rows(postgres)
    assert [(r["status"], r["exit_code"], r["error_class"]) for r in rows] == [
        ("failed", 1, "OperationalError"),
        ("ok", 0, None),
    ]
    assert rows[0]["finished_at"] < rows[1]["finished_at"]
    status = invoke("status", "--json", env={"DATABASE_URL": postgres.url})
    job = next(json.loads(line) for line in status.stdout.splitlines() if '"refresh-tokens"' in line)
    assert job["last_failure_error"].startswith("OperationalError: ")
    listed = invoke("history", "--json", "--status", "failed", env={"DATABASE_URL": postgres.url})
    (failed, summary) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (failed["task"], failed["status"], failed["error_class"]) == ("refresh-tokens", "failed", "OperationalError")
    assert summary == {
        "summary": "refresh-tokens",
        "runs": 1,
        "failures": 1,
        "rows_deleted": 0,
        "last_run_at": failed["finished_at"],
    }


def test_history_command_lists_filters_and_summarises(backend):
    seed_operator_data(backend)
    env = {"DATABASE_URL": backend.url}
    assert invoke("all", env=env).exit_code == 0
    assert invoke("magic-links", env={**env, "SKYBOT_CLEANUP_MAGIC_LINK_USED_COLUMN": "nope"}).exit_code == 2
    result = invoke("history", "--json", env=env)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    runs = [line for line in lines if "summary" not in line]
    assert [run["task"] for run in runs] == ["magic-links", *reversed(TASK_NAMES)]  # newest first
    assert runs[0]["status"] == "failed" and "nope" in runs[0]["error"]
    summary = {
        line["summary"]: (line["runs"], line["failures"], line["rows_deleted"]) for line in lines if "summary" in line
    }
    assert summary == {
        "idempotency-keys": (1, 0, 1),
        "magic-links": (2, 1, 2),
        "refresh-tokens": (1, 0, 2),
        "revoked-tokens": (1, 0, 1),
    }
    only = invoke("history", "--json", "--task", "refresh-tokens", "--since", "1h", "--limit", "5", env=env)
    assert [json.loads(line).get("task") for line in only.stdout.splitlines()] == ["refresh-tokens", None]
    table = invoke("history", env=env).stdout
    assert "magic-links: 2 runs, 1 failed, 2 rows deleted" in table
    assert invoke("history", "--status", "weird", env=env).exit_code == 2


def test_history_needs_no_database_create_privilege_when_its_schema_exists(postgres, pg_admin):
    """A DBA created the schema for the tool's role in advance (CREATE on the schema,
    not on the database): history works, and check says so."""
    seed_operator_data(postgres)
    role = f"skybot_hist_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'REVOKE CREATE ON DATABASE "{postgres.database}" FROM PUBLIC')
    try:
        for statement in least_privilege_grants(role):
            postgres.execute(statement)
        url = sa.make_url(postgres.url).set(username=role).render_as_string(hide_password=False)
        check = invoke("check", "--json", env={"DATABASE_URL": url})
        findings = [json.loads(line) for line in check.stdout.splitlines()]
        assert ("ok", 'run history: "skybot_cleanup"."runs" is writable (created on the first run)') in [
            (f["level"], f["message"]) for f in findings
        ]
        completed = run_cli("refresh-tokens", env={"DATABASE_URL": url})
        assert completed.returncode == 0 and "history_unavailable" not in completed.stderr, completed.stderr
        assert [r["status"] for r in history_rows(postgres)] == ["ok"]
    finally:
        postgres.execute(f'DROP SCHEMA IF EXISTS skybot_cleanup CASCADE; DROP OWNED BY "{role}"')
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP ROLE "{role}"')


def test_history_failure_is_a_warning_once_and_cleanup_succeeds(postgres, limited_role, tmp_path):
    seed_operator_data(postgres)
    role, url = limited_role
    completed = run_cli(
        "all",
        "--json",
        env={
            "DATABASE_URL": url,
            "SKYBOT_CLEANUP_RETRY_DELAY_MS": "1",
            "SKYBOT_CLEANUP_STATE_DIR": str(tmp_path / "state"),
        },
    )
    statuses = {o["task"]: (o["status"], o["rows"]) for o in map(json.loads, completed.stdout.splitlines())}
    # refresh-tokens and revoked-tokens lack DELETE: an error naming the privilege, exit 2.
    assert statuses == {
        "idempotency-keys": ("ok", 1),
        "refresh-tokens": ("failed", 0),
        "magic-links": ("ok", 2),
        "revoked-tokens": ("failed", 0),
    }
    assert completed.returncode == 2
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert failed["error"] == (
        f'{role} lacks DELETE on "public"."RefreshToken": every refresh-tokens run fails until it is granted '
        "(`skybot-cleanup check` prints the GRANT)"
    )
    assert completed.stderr.count('"history_unavailable"') == 1
    # Not lost: each run waits in the state directory for a history it can write.
    assert len(list((tmp_path / "state" / PENDING_RUNS).glob("*.json"))) == 4
    assert postgres.ids("MagicLink") == {"ml_live"}
