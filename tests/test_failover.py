"""A report that is true after a reconnect: a batched run through a multi-host URL across
a real promotion of a streaming standby. Asynchronous replication loses the old
primary's last commits; the run says it reconnected, counts the rows it committed before
as unconfirmed, walks the due rows again from their start, and reports a `remaining`
that is what the new primary really holds."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from datetime import timedelta

import pytest
from components import IS_ROOT, Cluster, start_cluster
from helpers import HOUR, events, least_privilege_grants, start_cli, unavailable, wait_until

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import insert_rows, refresh_token_row

ROLE = "skybot_failover"
PASSWORD = "failover-Secret-1"
DUE = 20_000
DUE_SQL = """SELECT count(*) FROM "RefreshToken" WHERE "expiresAt" < now() AT TIME ZONE 'UTC' AND "revokedAt" IS NULL"""


def due_on(cluster: Cluster) -> int:
    return int(cluster.psql(DUE_SQL))


@pytest.fixture
def pair():
    """A fresh primary and streaming standby (promotion spends them), seeded and in sync."""
    if not IS_ROOT and os.environ.get("USER") != "postgres":
        unavailable("the clusters are started as the postgres user: run the tests as root")
    generator = start_cluster(ROLE, PASSWORD)
    primary, standby = next(generator)
    engine = primary.superuser_engine()
    metadata = app_metadata()
    metadata.create_all(engine)
    now = utc_now()
    rows = [refresh_token_row(f"due_{i:05d}", now - HOUR - i * timedelta(seconds=1)) for i in range(DUE)]
    rows += [refresh_token_row(f"live_{i}", now + HOUR) for i in range(50)]
    with engine.begin() as conn:
        insert_rows(conn, metadata, {"RefreshToken": rows})
        for statement in least_privilege_grants(ROLE):
            conn.exec_driver_sql(statement)
    engine.dispose()
    lsn = primary.psql("SELECT pg_current_wal_lsn()")
    wait_until(
        lambda: standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") == "t",
        what="the standby to catch up",
    )
    yield primary, standby
    with contextlib.suppress(StopIteration):
        next(generator)


def promote(standby: Cluster) -> None:
    subprocess.run(
        ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--",
         str(standby.bindir / "pg_ctl"), "-D", str(standby.directory), "-w", "promote"],
        check=True, capture_output=True,
    )  # fmt: skip


def test_a_promotion_mid_run_is_reported_and_remaining_is_what_the_new_primary_holds(pair):
    primary, standby = pair
    url = (
        f"postgresql://{ROLE}:{PASSWORD}@localhost:{primary.port},localhost:{standby.port}/postgres"
        "?sslmode=require&target_session_attrs=read-write"
    )
    env = {"DATABASE_URL": url, "SKYBOT_CLEANUP_RETRY_DELAY_MS": "200", "SKYBOT_CLEANUP_MAX_RETRIES": "10"}
    run = start_cli("refresh-tokens", "--batch-size", "200", "--sleep-ms", "40", "--json", env=env)
    try:
        wait_until(lambda: due_on(primary) <= DUE - 2_000, what="the first batches on the primary")
        promote(standby)
        # The old primary goes on taking batches the new one never sees: lost on failover.
        at_promotion = due_on(primary)
        wait_until(lambda: due_on(primary) <= at_promotion - 1_000, what="batches after the promotion")
        primary.stop()
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    result = json.loads(out)
    left = due_on(standby)
    # True of the new primary: everything due there was walked again and deleted.
    assert (result["status"], result["remaining"], result["remaining_exact"], left) == ("ok", 0, True, 0)
    assert result["reconnects"] >= 1 and result["unconfirmed_rows"] >= 3_000
    reconnected = [event for event in events(err) if event["event"] == "reconnected"]
    assert reconnected and reconnected[0]["unconfirmed_rows"] >= 3_000
    # Rows committed on the lost primary are not counted as deleted: the new primary may
    # not have them, and those it lacked were deleted again after the reconnect.
    assert result["rows"] <= DUE <= result["rows"] + result["unconfirmed_rows"]
    history = standby.psql(
        "SELECT reconnects || ' ' || unconfirmed_rows || ' ' || remaining FROM skybot_cleanup.runs "
        "WHERE task = 'refresh-tokens'"
    )
    assert history == f"{result['reconnects']} {result['unconfirmed_rows']} 0"
