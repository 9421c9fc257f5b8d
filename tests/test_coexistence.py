"""The tool yields to the app (db/batches.py): beside the app's own statements it is never
the reason one fails, it never waits for a row the app holds, and no plan of its can go
quadratic when statistics are missing."""

from __future__ import annotations

import json
import random
import threading
from datetime import datetime

import psycopg
import pytest
import sqlalchemy as sa
from helpers import HOUR, env_for, events, run_cli, scalar, sqlalchemy_url, start_cli, statement_running, wait_until

from skybot_cleanup import db, health
from skybot_cleanup.clock import utc_now
from skybot_cleanup.registry import REGISTRY, Registry
from skybot_cleanup.settings import load

USERS = 200
# The app's logout-all, as Prisma sends it (updateMany on userAccountId, revokedAt null),
# and a stand-in that takes the same row locks without changing a row: every row of one
# user, in heap order (a bitmap heap scan), kept due, so the pressure lasts the run.
LOGOUT_ALL = """UPDATE "public"."RefreshToken" SET "revokedAt" = %s, "revokedReason" = 'user_logout_all',
                "updatedAt" = %s WHERE ("userAccountId" = %s AND "revokedAt" IS NULL)"""
LOCK_ALL = """SELECT 1 FROM "public"."RefreshToken" WHERE ("userAccountId" = %s AND "revokedAt" IS NULL)
              FOR NO KEY UPDATE"""


def seed_interleaved_lifetimes(backend, rows: int) -> None:
    """Tokens of 12 h and 3 d lifetimes (the app's two) written in creation order, each
    user's spread over the whole heap: expiry order and heap order disagree, as in the
    app's table."""
    backend.insert("RefreshToken", [])  # the parent rows the foreign keys want
    backend.execute(f"""
        INSERT INTO "UserAccount" (id, "accountId") SELECT 'ua_' || g, 'acc_1' FROM generate_series(0, {USERS}) g
            ON CONFLICT DO NOTHING;
        INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "expiresAt", "createdAt", "updatedAt")
        SELECT 't' || lpad(g::text, 7, '0'), md5(g::text), 'ua_' || mod(g, {USERS}), 'acc_1',
               created + CASE WHEN mod(g, 3) = 0 THEN interval '3 days' ELSE interval '12 hours' END, created, created
        FROM (SELECT g, (now() AT TIME ZONE 'UTC') - interval '5 days' + g * (interval '5 days' / {rows}) AS created
              FROM generate_series(1, {rows}) g) s
        ORDER BY g;
        ANALYZE "RefreshToken";
    """)


class LogoutAll(threading.Thread):
    """The app, on its own connection, as fast as it can: logout-all and its stand-in in turn."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.calls, self.errors = url, threading.Event(), 0, []

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                now, user = utc_now(), f"ua_{random.randrange(USERS)}"
                try:
                    if self.calls % 2:
                        conn.execute(LOGOUT_ALL, (now, now, user))
                    else:
                        conn.execute(LOCK_ALL, (user,))
                    self.calls += 1
                except psycopg.Error as exc:
                    self.errors.append(exc.sqlstate)


@pytest.mark.parametrize("mode", [["--batch-size", "2000"], ["--single-transaction"]], ids=["batched", "single"])
def test_the_app_is_never_a_deadlock_victim_and_every_deletion_is_exact(postgres, mode):
    """Batches that lock in index order made the app's statements deadlock victims here
    (measured with the previous design: 11 in one run); heap order makes a cycle impossible."""
    seed_interleaved_lifetimes(postgres, 200_000)
    with postgres.engine.connect() as conn:
        before = {
            row.id: row for row in conn.execute(sa.text('SELECT id, "expiresAt", "revokedAt" FROM "RefreshToken"'))
        }
    url = sa.make_url(postgres.url).render_as_string(hide_password=False)
    app = [LogoutAll(url) for _ in range(4)]
    for thread in app:
        thread.start()
    try:
        completed = run_cli("refresh-tokens", *mode, "--json", env=env_for(postgres))
    finally:
        for thread in app:
            thread.stop.set()
        for thread in app:
            thread.join()
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert sum(thread.calls for thread in app) > 20  # the app was busy
    assert [error for thread in app for error in thread.errors] == []  # no deadlock (40P01), nothing else
    cutoff = result["cutoff"].rstrip("Z")
    with postgres.engine.connect() as conn:
        after = {
            row.id: row for row in conn.execute(sa.text('SELECT id, "expiresAt", "revokedAt" FROM "RefreshToken"'))
        }
        still_due = conn.scalar(
            sa.text("""SELECT count(*) FROM "RefreshToken" WHERE "expiresAt" < :c AND "revokedAt" IS NULL"""),
            {"c": cutoff},
        )
    deleted = set(before) - set(after)
    assert len(deleted) == result["rows"]
    # Only rows due at the cutoff, never one revoked before the run: revoked ones are audit records.
    cutoff_at = datetime.fromisoformat(cutoff)
    assert all(before[i].expiresAt < cutoff_at and before[i].revokedAt is None for i in deleted)
    # Left: the rows the app held, some of which it has revoked since (no longer due).
    assert result["remaining_exact"] and still_due <= result["remaining"]


def test_one_held_row_does_not_stop_a_single_transaction_run(postgres):
    seed_interleaved_lifetimes(postgres, 2_000)
    with postgres.engine.connect() as app:
        held = app.scalar(
            sa.text("""SELECT id FROM "RefreshToken" WHERE "expiresAt" < now() AT TIME ZONE 'UTC'
                                    ORDER BY id LIMIT 1 FOR UPDATE""")
        )
        completed = run_cli(
            "refresh-tokens", "--single-transaction", "--json", env=env_for(postgres, lock_timeout_ms=60_000)
        )
        app.rollback()
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["remaining"], result["remaining_exact"]) == (0, 1, True), completed.stderr
    assert held in postgres.ids("RefreshToken")
    assert "batch_met_held_row" not in [event["event"] for event in events(completed.stderr)]  # never waited for it


def test_a_row_taken_after_the_statement_began_is_left_without_waiting_too(postgres):
    """A transaction that began after the statement's snapshot may hold a row by the time
    the scan reaches it: its xmax is newer than the snapshot, so it is left out as held."""
    seed_interleaved_lifetimes(postgres, 500)
    postgres.execute("""
        CREATE FUNCTION public.slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_catalog.pg_sleep(0.01); RETURN OLD; END $$;
        CREATE TRIGGER slow_row BEFORE DELETE ON public."RefreshToken" FOR EACH ROW EXECUTE FUNCTION public.slow_row();
    """)
    last_due = scalar(postgres, """SELECT max(id) FROM "RefreshToken" WHERE "expiresAt" < now() AT TIME ZONE 'UTC'""")
    with postgres.engine.connect() as app:
        run = start_cli(
            "refresh-tokens", "--single-transaction", "--json", env=env_for(postgres, lock_timeout_ms=60_000)
        )
        wait_until(lambda: statement_running(postgres), what="the DELETE to run")
        app.exec_driver_sql(f"""SELECT 1 FROM "RefreshToken" WHERE id = '{last_due}' FOR UPDATE""")
        out, err = run.communicate(timeout=120)
        app.rollback()
    result = json.loads(out)
    assert run.returncode == 0, err
    assert (result["remaining"], result["remaining_exact"]) == (1, True) and last_due in postgres.ids("RefreshToken")
    assert "batch_met_held_row" not in [event["event"] for event in events(err)]


def test_a_lock_timeout_names_the_row_it_waited_for(postgres):
    """The last resort, for a row taken between the guard's look and the delete: the lock
    timeout's context names the row, and the batch is redone without it."""
    seed_interleaved_lifetimes(postgres, 50)
    with postgres.engine.connect() as app, postgres.engine.connect() as tool:
        held = app.execute(sa.text('SELECT id, ctid::text FROM "RefreshToken" ORDER BY id LIMIT 1 FOR UPDATE')).one()
        tool.exec_driver_sql("SET lock_timeout = '50ms'")
        with pytest.raises(sa.exc.OperationalError) as raised:
            tool.execute(sa.text('DELETE FROM "RefreshToken" WHERE id = :id'), {"id": held.id})
        tool.rollback()
        app.rollback()
    assert db.held_tuple(raised.value) == held.ctid
    assert db.held_tuple(Exception("canceling statement due to lock timeout")) is None


def test_a_tie_group_on_a_table_never_analyzed_cannot_go_quadratic(postgres):
    """A mass revocation writes one "revokedAt" for every row. Never analyzed, the planner
    knows nothing: the batch statements' plans do not ask it (a TID range scan is forced)."""
    now = utc_now()
    postgres.insert("RefreshToken", [])  # the parent rows the app's foreign keys want
    postgres.execute('ALTER TABLE "RefreshToken" SET (autovacuum_enabled = off)')
    revoked_at = now - 100 * 24 * HOUR
    postgres.execute(f"""
        INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "expiresAt", "revokedAt", "updatedAt")
        SELECT 'mass_' || g, 'tok_' || g, 'ua_1', 'acc_1', '{now - 99 * 24 * HOUR}', '{revoked_at}', '{now}'
        FROM generate_series(1, 60000) g
    """)
    assert scalar(postgres, """SELECT reltuples FROM pg_class WHERE relname = 'RefreshToken'""") < 0  # unknown
    settings = load({"database_url": postgres.url}).settings
    task = REGISTRY.task("revoked-tokens")
    engine = sa.create_engine(sqlalchemy_url(postgres.url), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        table = db.bind_table(conn, "public", task.table, settings.table_names(task.table))
        due = task.due(table.columns, now - 90 * 24 * HOUR)
        for name, value in db.HEAP_WALK_PLANNER.items():
            conn.exec_driver_sql(f"SET LOCAL {name} = {value}")
        statement = sa.delete(table.table).where(db.ctid >= db.tid(0), db.ctid < db.tid(100), due)
        compiled = statement.compile(conn)
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params).scalars())
    engine.dispose()
    assert "Tid Range Scan" in plan and "Nested Loop" not in plan, plan
    completed = run_cli("revoked-tokens", "--json", env=env_for(postgres))
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["rows"], result["remaining"]) == (0, 60_000, 0), completed.stderr
    assert result["batches"] <= 60_000 // 10_000 * 3  # batches of about 10,000: the walk is linear


def test_no_statement_outlives_max_runtime(postgres):
    """A batch that would take a minute (a slow trigger) is cut at --max-runtime by its
    own statement_timeout; the run stops there, ok, with what it committed."""
    seed_interleaved_lifetimes(postgres, 300)
    postgres.execute("""
        CREATE FUNCTION public.slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_catalog.pg_sleep(0.5); RETURN OLD; END $$;
        CREATE TRIGGER slow_row BEFORE DELETE ON public."RefreshToken" FOR EACH ROW EXECUTE FUNCTION public.slow_row();
    """)
    completed = run_cli("refresh-tokens", "--max-runtime", "3", "--json", env=env_for(postgres))
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["status"], result["stopped_by"]) == (0, "ok", "max_runtime")
    # The mechanism: the batch's statement was cancelled at the deadline and rolled back,
    # not left to delete all 300 rows (150 s); the bound is 20 times the deadline, for a
    # busy machine.
    assert result["rows"] < 300 and result["remaining"] > 0
    assert result["duration_ms"] < 60_000


def test_hourly_runs_and_backlogs_read_the_walk_columns_index_whatever_the_statistics(postgres):
    """Statistics taken before a big backlog was deleted say most rows are expired, so the
    planner would count the few due rows through any index the predicate touches, such as
    "revokedAt" IS NULL, and read every live row to find them. The walk's choice and its
    remaining count go through the walk column's index, whatever the statistics say."""
    now = utc_now()
    postgres.insert("RefreshToken", [])  # the parent rows the app's foreign keys want
    postgres.execute('ALTER TABLE "RefreshToken" SET (autovacuum_enabled = off)')
    # 10 expired (the backlog), 5 live and 1 revoked of every 16, expiries a day apart at most.
    postgres.execute(f"""
        INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "expiresAt", "revokedAt", "updatedAt")
        SELECT kind || g, 'tok_' || g, 'ua_1', 'acc_1', expires + mod(g * 7919, 86400) * interval '1 second',
               CASE kind WHEN 'rev_' THEN expires END, '{now}'
        FROM (SELECT g, CASE WHEN mod(g, 16) < 10 THEN 'old_' WHEN mod(g, 16) < 15 THEN 'live_' ELSE 'rev_' END AS kind,
                     CASE WHEN mod(g, 16) BETWEEN 10 AND 14 THEN '{now + HOUR}' ELSE '{now - 30 * 24 * HOUR}' END
                       ::timestamp AS expires
              FROM generate_series(1, 32000) g) rows
    """)
    postgres.execute('ANALYZE "RefreshToken"')
    postgres.execute("""DELETE FROM "RefreshToken" WHERE left(id, 4) = 'old_'""")  # the backlog, gone; stats stale
    postgres.execute(f"""
        INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "expiresAt", "updatedAt")
        SELECT 'due_' || g, 'due_tok_' || g, 'ua_1', 'acc_1', '{now - HOUR}', '{now}' FROM generate_series(1, 5) g
    """)
    scans_sql = """SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_indexes
                   WHERE relname = 'RefreshToken' AND indexrelname = :name"""

    def scans(name: str) -> int:
        return int(scalar(postgres, scans_sql, name=f"RefreshToken_{name}_idx"))

    revoked_at_scans = scans("revokedAt")
    seen = scans("expiresAt")

    def then_its_scans_arrive() -> None:
        # A backend reports its scans as it exits, just after the process has gone.
        nonlocal seen
        wait_until(lambda: scans("expiresAt") > seen, what="the command's index scans")
        seen = scans("expiresAt")

    completed = run_cli("refresh-tokens", "--json", env=env_for(postgres))
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["rows"], result["remaining"]) == (0, 5, 0), completed.stderr
    then_its_scans_arrive()
    assert scalar(postgres, """SELECT count(*) FROM "RefreshToken" WHERE left(id, 5) = 'live_'""") == 10_000
    # The next hour, nothing due: one count through the index, and no walk at all.
    completed = run_cli("refresh-tokens", "--json", env=env_for(postgres))
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["rows"], result["batches"], result["remaining"]) == (0, 0, 0, 0)
    then_its_scans_arrive()
    assert scans("revokedAt") == revoked_at_scans
    # The backlog that metrics and status report counts the same way (the transaction's own
    # scans; metrics also counts live sessions, which is the "revokedAt" index's job).
    settings = load({"database_url": postgres.url}).settings
    engine = db.create_engine(settings.database_target(), settings.session(), "test")
    with engine.connect() as conn:
        run = db.RunConnection(conn, settings.session(), "test", read_only=True, planner=db.INDEX_WALK_PLANNER)
        run.begin()
        # This task alone: revoked-tokens' own backlog is the "revokedAt" index's job.
        alone = Registry((REGISTRY.task("refresh-tokens"),), REGISTRY.metrics)
        backlog = health.judge(run, settings, "public", utc_now(), alone).job("refresh-tokens").backlog
        assert backlog is not None and backlog.due is not None and backlog.due.value == 0
        xact_scans = {
            name: conn.scalar(sa.text(f"""SELECT pg_stat_get_xact_numscans('public."{relation}"'::regclass)"""))
            for name, relation in [
                ("table", "RefreshToken"),  # its sequential scans
                ("revokedAt", "RefreshToken_revokedAt_idx"),
                ("expiresAt", "RefreshToken_expiresAt_idx"),
            ]
        }
        run.rollback()
    engine.dispose()
    assert (xact_scans["table"], xact_scans["revokedAt"]) == (0, 0) and xact_scans["expiresAt"] >= 1, xact_scans
