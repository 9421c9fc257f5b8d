"""Every batch is bounded in rows, whatever the table's shape, statistics or earlier run:
the server records the size of every DELETE (a statement trigger with a transition table),
and none passes the batch size; --max-rows N never deletes more than N; a run never says
nothing remains while a partition or an inheritance child still holds due rows."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from cases import PARTITIONED_REFRESH_TOKEN
from helpers import DAY, HOUR, check_findings, env_for, run_cli, scalar

from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import ACCOUNT, USER_ACCOUNT

SECOND = timedelta(seconds=1)

# Every DELETE on a table, its row count as the server saw it (qualified: the tool's
# transactions pin search_path to pg_catalog).
RECORD_DELETES = """
CREATE TABLE public.delete_sizes (at timestamptz DEFAULT clock_timestamp(), rows bigint);
CREATE FUNCTION public.record_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.delete_sizes (rows) SELECT pg_catalog.count(*) FROM gone; RETURN NULL; END $$;
CREATE TRIGGER record_delete AFTER DELETE ON public."{table}" REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION public.record_delete();
"""


def delete_sizes(backend) -> list[int]:
    with backend.engine.connect() as conn:
        return [int(n) for n in conn.exec_driver_sql("SELECT rows FROM public.delete_sizes ORDER BY at").scalars()]


def insert_tokens(backend, table: str, prefix: str, count: int, expires: str, *, revoked: str = "NULL") -> None:
    """`count` refresh tokens expiring at `expires` minus a second each, in expiry order."""
    backend.execute(f"""
        INSERT INTO public."{table}" (id, token, "userAccountId", "accountId", "expiresAt", "revokedAt", "updatedAt")
        SELECT '{prefix}' || g, 'tok-{prefix}' || g, '{USER_ACCOUNT}', '{ACCOUNT}',
               TIMESTAMP '{expires}' - g * INTERVAL '1 second', {revoked}, TIMESTAMP '{expires}'
        FROM generate_series(1, {count}) g
    """)


def run_json(backend, *args: str, **settings: object) -> dict:
    completed = run_cli("refresh-tokens", *args, "--json", env=env_for(backend, **settings))
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def due_left(backend, table: str = "RefreshToken") -> int:
    return int(
        scalar(
            backend,
            f"""SELECT count(*) FROM public."{table}" WHERE "expiresAt" < (now() AT TIME ZONE 'UTC')
                AND "revokedAt" IS NULL""",
        )
    )


def test_after_a_capped_run_the_next_one_keeps_to_the_batch_size(postgres):
    """The README's drain: capped runs until nothing remains. After one, the head of the
    heap is empty and the rest dense: a batch whose span of pages grew over the empty head
    must still take no more than a batch (it took 449,490 of 1M at batch size 10,000)."""
    now = utc_now()
    postgres.insert("RefreshToken", [])  # the parent rows its foreign keys need
    insert_tokens(postgres, "RefreshToken", "due_", 30_000, str(now - HOUR))
    insert_tokens(postgres, "RefreshToken", "live_", 2_000, str(now + 30 * DAY))
    postgres.execute('ANALYZE "RefreshToken"')
    postgres.execute(RECORD_DELETES.format(table="RefreshToken"))
    capped = run_json(postgres, "--batch-size", "1000", "--max-rows", "12000")
    assert (capped["rows"], capped["stopped_by"], capped["remaining"]) == (12_000, "max_rows", 18_000)
    after = run_json(postgres, "--batch-size", "1000")
    assert (after["rows"], after["remaining"], after["remaining_exact"]) == (18_000, 0, True)
    sizes = delete_sizes(postgres)
    assert sum(sizes) == 30_000 and max(sizes) <= 1000, sizes
    assert due_left(postgres) == 0


@pytest.mark.parametrize("analyzed", [True, False], ids=["parent analyzed", "never analyzed"])
def test_a_partitioned_table_keeps_to_the_batch_size_and_to_max_rows(postgres, analyzed):
    """ANALYZE sets a partitioned parent's relpages to -1; batches are sized from the
    partitions' own figures, and bounded in rows whatever they say."""
    now = utc_now()
    postgres.execute(PARTITIONED_REFRESH_TOKEN.format(old=now - 60 * DAY, soon=now + DAY))
    insert_tokens(postgres, "RefreshToken", "old_", 9_000, str(now - 61 * DAY))
    insert_tokens(postgres, "RefreshToken", "recent_", 6_000, str(now - HOUR))
    insert_tokens(postgres, "RefreshToken", "live_", 500, str(now + 30 * DAY))
    if analyzed:
        postgres.execute('ANALYZE "RefreshToken"')
        assert scalar(postgres, """SELECT relpages FROM pg_class WHERE relname = 'RefreshToken'""") == -1
    postgres.execute(RECORD_DELETES.format(table="RefreshToken"))
    capped = run_json(postgres, "--batch-size", "1000", "--max-rows", "1000")
    assert (capped["rows"], capped["remaining"]) == (1000, 14_000)
    assert sum(delete_sizes(postgres)) == 1000 and max(delete_sizes(postgres)) <= 1000
    rest = run_json(postgres, "--batch-size", "1000")
    assert (rest["rows"], rest["remaining"], rest["remaining_exact"]) == (14_000, 0, True)
    sizes = delete_sizes(postgres)
    assert sum(sizes) == 15_000 and max(sizes) <= 1000, sizes
    assert due_left(postgres) == 0


INHERITING = """
CREATE TABLE public."IdempotencyKey_2025" () INHERITS (public."IdempotencyKey");
CREATE TABLE public."IdempotencyKey_2026" () INHERITS (public."IdempotencyKey");
"""


def insert_keys(backend, table: str, prefix: str, count: int, expires: str) -> None:
    backend.execute(f"""
        INSERT INTO public."{table}" (id, key, "accountId", endpoint, method, "statusCode", "expiresAt")
        SELECT '{prefix}' || g, 'key-{prefix}' || g, '{ACCOUNT}', '/api/messages', 'POST', 200,
               TIMESTAMP '{expires}' - g * INTERVAL '1 second'
        FROM generate_series(1, {count}) g
    """)


def keys_left(backend) -> dict[str, int]:
    with backend.engine.connect() as conn:
        rows = conn.exec_driver_sql("""SELECT tableoid::regclass::text, count(*) FROM "IdempotencyKey"
                                       WHERE "expiresAt" < (now() AT TIME ZONE 'UTC') GROUP BY 1""").all()
    return {str(name): int(count) for name, count in rows}


def test_inheritance_children_are_walked_and_counted(postgres):
    """Old-style INHERITS children hold rows of their own, each with its own ctids: every
    child is walked, a capped run's remaining counts them, and only an exact zero is zero."""
    now = utc_now()
    postgres.execute(INHERITING)
    postgres.insert("IdempotencyKey", [])  # the parent rows its foreign key needs
    insert_keys(postgres, "IdempotencyKey", "parent_", 180, str(now - HOUR))
    insert_keys(postgres, "IdempotencyKey_2025", "y2025_", 1_500, str(now - 300 * DAY))
    insert_keys(postgres, "IdempotencyKey_2026", "y2026_", 1_700, str(now - HOUR))
    insert_keys(postgres, "IdempotencyKey_2026", "live_", 300, str(now + DAY + 400 * SECOND))
    postgres.execute("ANALYZE")
    postgres.execute(RECORD_DELETES.format(table="IdempotencyKey"))
    env = env_for(postgres)
    first = json.loads(
        run_cli("idempotency-keys", "--batch-size", "500", "--max-rows", "2000", "--json", env=env).stdout
    )
    assert (first["rows"], first["remaining"], first["remaining_exact"]) == (2000, 1380, True)
    second = json.loads(run_cli("idempotency-keys", "--batch-size", "500", "--json", env=env).stdout)
    assert (second["rows"], second["remaining"], second["remaining_exact"]) == (1380, 0, True)
    assert keys_left(postgres) == {}
    sizes = delete_sizes(postgres)
    assert sum(sizes) == 3_380 and max(sizes) <= 500, sizes
    assert scalar(postgres, 'SELECT count(*) FROM "IdempotencyKey"') == 300  # the live ones
    # check names the shape and what the runs do with it.
    findings = check_findings(run_cli("check", "--json", env=env))
    assert (
        "info",
        '"public"."IdempotencyKey" has 2 inheritance child table(s) (INHERITS): batches walk the heap of the '
        "table and of every child (their indexes are their own), and every count covers them all",
    ) in findings
