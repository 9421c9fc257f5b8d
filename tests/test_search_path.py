"""A path no one else controls (CVE-2018-1058): whatever the database's or the role's
search_path says, and whatever a schema on it holds, nothing planted there runs inside
the tool, and every deletion stays exact.

Every planted object raises when called, so one that runs shows as a failed command."""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa
from helpers import HOUR, as_role, database_url, env_for, history_rows, least_privilege_grants, run_cli, seed_tokens

from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import idempotency_key_row, magic_link_row

# Closer argument types than pg_catalog's (integer for the bigint 0, name for text...),
# or the same ones in a schema ahead of pg_catalog: each would win an unqualified call.
PLANTED = """
CREATE SCHEMA evil;
GRANT USAGE ON SCHEMA evil TO PUBLIC;
CREATE FUNCTION evil.planted() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'PLANTED OBJECT RAN'; END $$;
CREATE FUNCTION evil.hashtextextended(text, integer) RETURNS bigint LANGUAGE sql AS 'SELECT 0 WHERE evil.planted()';
CREATE FUNCTION public.hashtextextended(text, integer) RETURNS bigint LANGUAGE sql
    AS 'SELECT 0 WHERE evil.planted()';
CREATE FUNCTION evil.has_schema_privilege(name, text) RETURNS boolean LANGUAGE sql AS 'SELECT evil.planted()';
CREATE FUNCTION evil.has_table_privilege(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT evil.planted()';
CREATE FUNCTION evil.current_schema() RETURNS name LANGUAGE sql AS 'SELECT NULL::name WHERE evil.planted()';
CREATE FUNCTION evil.set_config(text, text, boolean) RETURNS text LANGUAGE sql
    AS 'SELECT NULL::text WHERE evil.planted()';
CREATE FUNCTION evil.current_setting(text) RETURNS text LANGUAGE sql AS 'SELECT NULL::text WHERE evil.planted()';
CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql
    AS 'SELECT NULL::timestamptz WHERE evil.planted()';
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT NULL::timestamptz WHERE evil.planted()';
CREATE FUNCTION evil.pg_is_in_recovery() RETURNS boolean LANGUAGE sql AS 'SELECT evil.planted()';
CREATE FUNCTION evil.to_regclass(text) RETURNS regclass LANGUAGE sql AS 'SELECT NULL::regclass WHERE evil.planted()';
CREATE FUNCTION evil.quote_ident(text) RETURNS text LANGUAGE sql AS 'SELECT NULL::text WHERE evil.planted()';
CREATE FUNCTION evil.format_type(oid, integer) RETURNS text LANGUAGE sql AS 'SELECT NULL::text WHERE evil.planted()';
CREATE FUNCTION evil.pg_try_advisory_lock(bigint) RETURNS boolean LANGUAGE sql AS 'SELECT evil.planted()';
CREATE FUNCTION evil.pg_advisory_unlock_all() RETURNS void LANGUAGE sql AS 'SELECT WHERE evil.planted()';
CREATE FUNCTION evil.version() RETURNS text LANGUAGE sql AS 'SELECT NULL::text WHERE evil.planted()';
CREATE FUNCTION evil.count_step(bigint) RETURNS bigint LANGUAGE sql AS 'SELECT NULL::bigint WHERE evil.planted()';
CREATE AGGREGATE evil.count(*) (SFUNC = evil.count_step, STYPE = bigint, INITCOND = '0');
CREATE FUNCTION evil.min_step(timestamp, timestamp) RETURNS timestamp LANGUAGE sql
    AS 'SELECT NULL::timestamp WHERE evil.planted()';
CREATE AGGREGATE evil.min(timestamp) (SFUNC = evil.min_step, STYPE = timestamp);
-- Operators ahead of pg_catalog's: "every row is due", "every text matches".
CREATE FUNCTION evil.always(timestamp, timestamp) RETURNS boolean LANGUAGE sql AS 'SELECT evil.planted()';
CREATE OPERATOR evil.< (LEFTARG = timestamp, RIGHTARG = timestamp, FUNCTION = evil.always);
CREATE OPERATOR evil.>= (LEFTARG = timestamp, RIGHTARG = timestamp, FUNCTION = evil.always);
CREATE FUNCTION evil.same(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT evil.planted()';
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.same);
-- A same-named table in a schema ahead of the app's.
CREATE TABLE evil."RefreshToken" (LIKE public."RefreshToken" INCLUDING ALL);
INSERT INTO evil."RefreshToken" SELECT * FROM public."RefreshToken";
GRANT SELECT, DELETE ON evil."RefreshToken" TO PUBLIC;
"""


def ids(backend, table: str) -> set[str]:
    with backend.engine.connect() as conn:
        return set(conn.scalars(sa.text(f"SELECT id FROM {table}")))


def plant(backend, roles: list[str]) -> None:
    backend.execute(PLANTED)
    backend.execute(f'ALTER DATABASE "{backend.database}" SET search_path = evil, pg_catalog, public')
    for role in roles:
        backend.execute(
            f'ALTER ROLE "{role}" IN DATABASE "{backend.database}" SET search_path = evil, pg_catalog, public'
        )


@pytest.fixture(params=["superuser", "least-privilege"])
def hostile(request, postgres, pg_admin):
    """The app's database with objects planted on its search_path, and the URL of a
    role to run the tool as: a superuser, or one with only what the README asks."""
    now = utc_now()
    seed_tokens(postgres, now)
    postgres.insert("IdempotencyKey", [idempotency_key_row("ik_expired", now - HOUR)])
    postgres.insert("MagicLink", [magic_link_row("ml_used", now + HOUR, used=True)])
    if request.param == "superuser":
        plant(postgres, [])
        yield postgres.url
        return
    role = f"skybot_lp_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
    for statement in least_privilege_grants(role):
        postgres.execute(statement)
    plant(postgres, [role])
    yield as_role(postgres.url, role)
    postgres.engine.dispose()
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{postgres.database}" WITH (FORCE)')
        conn.exec_driver_sql(f'DROP ROLE "{role}"')


COMMANDS = [
    (["refresh-tokens", "--dry-run", "--json"], 0),
    (["check", "--json"], 0),
    (["refresh-tokens", "--json"], 0),
    (["idempotency-keys", "--batch-size", "1", "--json"], 0),
    (["all", "--json"], 0),
    (["metrics", "--json"], 0),
    (["status", "--json"], None),  # healthy or not: every job has not run on schedule yet
    (["history", "--json"], 0),
]


def test_no_planted_object_runs_in_any_command_and_deletions_stay_exact(hostile, postgres):
    env = env_for(postgres)
    env["DATABASE_URL"] = hostile
    for args, code in COMMANDS:
        completed = run_cli(*args, env=env)
        assert "PLANTED" not in completed.stdout + completed.stderr, (args, completed.stderr)
        if code is not None:
            assert completed.returncode == code, (args, completed.stderr)
    # Exactly the due rows of the app's tables, and nothing of the decoy table. (Qualified:
    # this test's own sessions have the hostile path too.)
    assert ids(postgres, 'public."RefreshToken"') == {"live", "revoked_expired"}
    assert ids(postgres, 'public."IdempotencyKey"') == ids(postgres, 'public."MagicLink"') == set()
    assert ids(postgres, 'evil."RefreshToken"') == {"expired_1", "expired_2", "live", "revoked_expired"}
    assert {row["status"] for row in history_rows(postgres)} == {"ok"}


def test_the_demo_plants_and_cleans_in_an_empty_database_with_a_hostile_path(pg_admin, pg_server_url):
    name = f"skybot_demo_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET search_path = evil, pg_catalog, public')
    url = database_url(pg_server_url, name)
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            # The demo's own tables do not exist yet: plant what needs none of them.
            conn.exec_driver_sql(PLANTED.split("-- A same-named table")[0])
        completed = run_cli("demo", "--database-url", url, "--json")
        assert completed.returncode == 0, completed.stderr
        assert "PLANTED" not in completed.stdout + completed.stderr
        removed = {row_id for line in completed.stdout.splitlines() for row_id in json.loads(line)["removed"]}
        assert "rt_expired_1h" in removed and "rt_live" not in removed
    finally:
        engine.dispose()
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
