"""Replica-aware pacing against a real streaming standby: a standby that stops replaying
holds a batched run (the wait counts against --max-runtime and is reported), one that
replays lets it finish, and a role that cannot see the standbys' positions is told so
once, by the run and by check."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import timedelta

import pytest
from components import IS_ROOT, Cluster, start_cluster
from helpers import HOUR, check_findings, events, least_privilege_grants, run_cli, unavailable, wait_until

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import insert_rows, refresh_token_row

ROLE = "skybot_paced"
PASSWORD = "paced-Secret-1"
DUE = 6_000
replica_group = pytest.mark.xdist_group("replicas")


@pytest.fixture(scope="module")
def pair():
    """A primary and its streaming standby; the role may read the standbys' positions
    (pg_read_all_stats) unless a test takes it away."""
    if not IS_ROOT and os.environ.get("USER") != "postgres":
        unavailable("the clusters are started as the postgres user: run the tests as root")
    generator = start_cluster(ROLE, PASSWORD)
    primary, standby = next(generator)
    engine = primary.superuser_engine()
    app_metadata().create_all(engine)
    with engine.begin() as conn:
        for statement in least_privilege_grants(ROLE):
            conn.exec_driver_sql(statement)
    engine.dispose()
    yield primary, standby
    with contextlib.suppress(StopIteration):
        next(generator)


def seed(primary: Cluster, count: int = DUE) -> None:
    engine = primary.superuser_engine()
    metadata = app_metadata()
    now = utc_now()
    with engine.begin() as conn:
        conn.exec_driver_sql('TRUNCATE "RefreshToken"')
        rows = [refresh_token_row(f"due_{i:05d}", now - HOUR - i * timedelta(seconds=1)) for i in range(count)]
        insert_rows(conn, metadata, {"RefreshToken": [*rows, refresh_token_row("live", now + HOUR)]})
    engine.dispose()


def url_of(primary: Cluster) -> str:
    return f"postgresql://{ROLE}:{PASSWORD}@localhost:{primary.port}/postgres?sslmode=require"


def due_on(cluster: Cluster) -> int:
    return int(
        cluster.psql("""SELECT count(*) FROM "RefreshToken" WHERE "revokedAt" IS NULL AND "expiresAt" < now()""")
    )


@replica_group
def test_a_standby_that_stops_replaying_holds_the_run_until_its_cap(pair):
    primary, standby = pair
    seed(primary)
    primary.psql(f"GRANT pg_read_all_stats TO {ROLE}")
    standby.psql("SELECT pg_wal_replay_pause()")
    try:
        completed = run_cli(
            "refresh-tokens",
            # Twelve batches, a tenth of a second apart: more than half the target after a few.
            "--batch-size", "500", "--sleep-ms", "100", "--max-replica-lag", "1", "--max-runtime", "8", "--json",
            env={"DATABASE_URL": url_of(primary)},
        )  # fmt: skip
    finally:
        standby.psql("SELECT pg_wal_replay_resume()")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    # A few batches, then the standby's stall made it wait, until the cap stopped it.
    assert result["stopped_by"] == "max_runtime"
    assert 0 < result["rows"] < DUE and result["rows"] + result["remaining"] == DUE
    assert result["replica_wait_s"] > 2, result
    assert "replica_lag_unknown" not in [event["event"] for event in events(completed.stderr)]
    recorded = primary.psql(
        "SELECT replica_wait_s > 2 FROM skybot_cleanup.runs WHERE task = 'refresh-tokens' ORDER BY id DESC LIMIT 1"
    )
    assert recorded == "t"
    # Replaying again: the next run goes to the end, and the standby holds what the primary does.
    again = run_cli(
        "refresh-tokens", "--batch-size", "500", "--max-replica-lag", "1", "--json",
        env={"DATABASE_URL": url_of(primary)},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["remaining"], due_on(primary)) == (0, 0)
    wait_until(lambda: due_on(standby) == 0, what="the standby to replay the deletions")


@replica_group
def test_a_role_that_cannot_see_the_standbys_is_told_once_and_how_to_fix_it(pair):
    primary, _standby = pair
    seed(primary, 3_000)
    primary.psql(f"REVOKE pg_read_all_stats FROM {ROLE}")
    completed = run_cli("refresh-tokens", "--batch-size", "500", "--json", env={"DATABASE_URL": url_of(primary)})
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert (result["rows"], result["remaining"], result["replica_wait_s"]) == (3_000, 0, 0)
    unknown = [event for event in events(completed.stderr) if event["event"] == "replica_lag_unknown"]
    assert len(unknown) == 1 and "pg_read_all_stats" in unknown[0]["hint"]
    assert any("cannot read the streaming standbys' replay positions" in warning for warning in result["warnings"])
    checked = run_cli("check", "--json", env={"DATABASE_URL": url_of(primary)})
    (finding,) = [f for f in map(json.loads, checked.stdout.splitlines()) if "standby" in f["message"]]
    assert finding["level"] == "warning" and finding["detail"] == [f'GRANT pg_read_all_stats TO "{ROLE}";']
    primary.psql(f"GRANT pg_read_all_stats TO {ROLE}")
    findings = check_findings(run_cli("check", "--json", env={"DATABASE_URL": url_of(primary)}))
    (finding,) = [f for f in findings if "standby" in f[1]]
    assert finding == ("ok", "1 streaming standby, its replay lag visible: batched runs keep it under 10 s "
                             "(SKYBOT_CLEANUP_MAX_REPLICA_LAG_S)")  # fmt: skip
