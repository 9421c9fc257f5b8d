"""An upgrade loses nothing and leaves no gap (issue 26): the previous release (34a245a,
installed from its commit) runs every job and keeps an outage's run in its spool; right
after the upgrade every read-only command works at once, on the history table as that
release made it; the first runs of this release record the outage, and add the columns
the table lacked."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from helpers import JOB_NAMES, events, outage, run_cli, run_release, seed_operator_data, start_cli

from skybot_cleanup import __version__
from skybot_cleanup.history import ADDED_COLUMNS


def recorded(backend) -> list[tuple[str, str, str]]:
    """(run_id, task, status) of every run, read with the columns every release has."""
    with backend.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT run_id, task, status FROM skybot_cleanup.runs ORDER BY id").all()
    return [(str(run_id), str(task), str(status)) for run_id, task, status in rows]


def columns(backend) -> set[str]:
    with backend.engine.connect() as conn:
        return set(
            conn.scalars(
                sa.text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = 'skybot_cleanup' AND table_name = 'runs'"
                )
            )
        )


@pytest.mark.xdist_group("previous-release")
def test_an_upgrade_loses_nothing_and_every_command_works_at_once(postgres, tmp_path, previous_release):
    seed_operator_data(postgres)
    state = tmp_path / "state"
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)}
    for job in JOB_NAMES:
        ran = run_release(previous_release, job, env=env)
        assert ran.returncode == 0, (job, ran.stderr)
    down = run_release(previous_release, "magic-links", env=outage(postgres.url, state))
    assert down.returncode == 1, down.stderr
    before = recorded(postgres)
    assert [task for _, task, _ in before] == JOB_NAMES
    old_columns = columns(postgres)
    assert "version" not in old_columns  # as 0.1.0 made the table

    # Right after the upgrade, before any cleanup of this release: every command at once.
    commands = [("status", "--json"), ("history", "--json"), ("check", "--json"), ("config",), ("metrics", "--json")]
    started = {command: start_cli(*command, env=env) for command in commands}
    finished = {command: (process.communicate(timeout=120), process.returncode) for command, process in started.items()}
    for command, ((out, err), code) in finished.items():
        # status: 1, and truly so: magic-links' newest run is the outage, still in the spool.
        assert code == (1 if command[0] == "status" else 0), (command, out, err)
        assert "Traceback" not in err
    (status_out, _), _ = finished[("status", "--json")]
    health = {job["task"]: job["health"] for job in map(json.loads, status_out.splitlines())}
    assert health == {job: "FAILING" if job == "magic-links" else "OK" for job in JOB_NAMES}
    (history_out, _), _ = finished[("history", "--json")]
    listed = {line["run_id"] for line in map(json.loads, history_out.splitlines()) if "run_id" in line}
    assert {run_id for run_id, _, _ in before} <= listed

    # The first run of this release: the outage's run recorded (by this run or the metrics
    # job), the table given its new columns, nothing set aside.
    cleaned = run_cli("refresh-tokens", "--json", env=env)
    assert cleaned.returncode == 0, cleaned.stderr
    after = recorded(postgres)
    assert after[: len(before)] == before  # nothing lost
    outage_runs = [run for run in after if run[1] == "magic-links" and run[2] == "failed"]
    assert len(outage_runs) == 1
    assert set(ADDED_COLUMNS) <= columns(postgres)
    assert sorted(str(path.relative_to(state)) for path in state.rglob("*.bad")) == []
    assert "spool_entry_quarantined" not in [event["event"] for event in events(cleaned.stderr)]
    # Every row of this release says which release recorded it; the old ones, nothing.
    run_id = json.loads(cleaned.stdout)["run_id"]
    with postgres.engine.connect() as conn:
        versions = dict(conn.exec_driver_sql("SELECT run_id, version FROM skybot_cleanup.runs").all())
    assert versions[run_id] == __version__
    assert all(versions[old] is None for old, _, _ in before)
