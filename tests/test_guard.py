"""The held-row guard on its own (db.batches.guard): a due row another transaction holds is
left out and counted, and nothing else is; the statements that delete rely on it never to
wait for the app."""

from __future__ import annotations

import sqlalchemy as sa
from helpers import HOUR

from skybot_cleanup import db
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import refresh_token_row
from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.settings import load


def guarded_ids(postgres) -> tuple[set[str], int]:
    """The due rows the guard lets through, and how many it counted as held, in one
    transaction of the tool's own."""
    settings = load({"database_url": postgres.url}).settings
    task = REGISTRY.task("refresh-tokens")
    engine = db.create_engine(settings.database_target(), settings.session(), "test")
    with engine.connect() as conn:
        run = db.RunConnection(conn, settings.session(), "test")
        run.begin()
        table = db.bind_table(conn, "public", task.table, settings.table_names(task.table))
        due = task.due(table.columns, utc_now())
        statement = sa.select(table.table.c.id).where(due, db.guard(due, run.snapshot_xmax, count=True))
        through = set(conn.scalars(statement))
        held = int(conn.exec_driver_sql(f"SELECT pg_catalog.current_setting('{db.HELD_COUNTER}')").scalar() or 0)
        run.rollback()
    engine.dispose()
    return through, held


def test_a_row_the_app_holds_is_left_out_and_counted_and_only_that_one(postgres):
    now = utc_now()
    postgres.insert(
        "RefreshToken",
        [
            refresh_token_row("due_free", now - HOUR),
            refresh_token_row("due_held", now - HOUR),
            refresh_token_row("due_updated", now - HOUR),
            refresh_token_row("live_held", now + HOUR),
        ],
    )
    # An update the app committed leaves an xmax behind: not held.
    postgres.execute("""UPDATE "RefreshToken" SET "lastUsedAt" = now() WHERE id = 'due_updated'""")
    with postgres.engine.connect() as app:
        app.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id IN ('due_held', 'live_held') FOR UPDATE""")
        through, held = guarded_ids(postgres)
        app.rollback()
    assert through == {"due_free", "due_updated"}
    assert held == 1  # the due one: a held row that is not due is not the batch's business
    # Once the app lets go, the guard lets it through.
    assert guarded_ids(postgres) == ({"due_free", "due_held", "due_updated"}, 0)
