"""Several statements in one round trip (psycopg's pipeline mode): a report's reads,
each failing alone, and a whole short transaction (a history write).

A report (status, metrics, check) reads a dozen things: the newest runs, every task's
backlog, the measures. Sent one by one, each costs a round trip, and a cron job in
another region than its database pays 10 to 40 ms for each. Here they are sent at once,
in the open transaction; only if one fails (a privilege the catalog did not show, a
timeout) are they read again one at a time, each under a savepoint, so that one failure
costs only its own answer. A history write (insert, prune, commit) goes at once too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from skybot_cleanup.db.connection import PINNED_SEARCH_PATH, RunConnection, savepoint

Statement = tuple[str, Mapping[str, Any]] | str  # SQL and its parameters, or SQL alone

Readable = sa.Select[Any] | sa.CompoundSelect[Any] | sa.TextClause


@dataclass
class Pending:
    """One read: its rows once the reads have run, or the error it met."""

    statement: Readable
    explain: bool = False  # EXPLAIN (FORMAT JSON) of the statement, not the statement
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    error: BaseException | None = None

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows and self.rows[0] else None


class Reads:
    def __init__(self, run: RunConnection):
        self.run = run
        self.pending: list[Pending] = []

    def add(self, statement: Readable, *, explain: bool = False) -> Pending:
        pending = Pending(statement, explain)
        self.pending.append(pending)
        return pending

    def run_all(self) -> None:
        """Every read added since the last call."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        if self.run.on_postgres:
            import psycopg

            try:
                cursors = send_at_once(self.run, [_sql(read, self.run) for read in pending])
                answers = [cursor.fetchall() if cursor.description else [] for cursor in cursors]
            except psycopg.DatabaseError:  # the server's refusal of one of them: each alone, below
                self.run.undo_work()
            else:
                for read, rows in zip(pending, answers, strict=True):
                    read.rows = rows
                return
        conn = self.run.conn
        for read in pending:
            try:
                with savepoint(conn, "one_read"):
                    if read.explain:
                        sql, params = _sql(read, self.run)
                        read.rows = [tuple(row) for row in conn.exec_driver_sql(sql, params).all()]
                    else:
                        read.rows = [tuple(row) for row in conn.execute(read.statement).all()]
            except sa.exc.DBAPIError as exc:
                read.error = exc


def _sql(read: Pending, run: RunConnection) -> tuple[str, dict[str, Any]]:
    compiled = read.statement.compile(dialect=run.conn.dialect, compile_kwargs={"render_postcompile": True})
    sql = str(compiled)
    return (f"EXPLAIN (FORMAT JSON) {sql}" if read.explain else sql), dict(compiled.params)


def transaction_in_one_round_trip(run: RunConnection, statements: Sequence[sa.ClauseElement]) -> list[Any]:
    """A whole transaction, its prologue included, sent at once (PostgreSQL only): each
    statement's rows, or row count for one that returns none. The first that fails
    raises, the rest are not run, and the transaction is rolled back. A history write
    costs one round trip, not five."""
    sent = time.monotonic()
    names, prologue = run.prologue(take_lock=False)
    opening: list[Statement] = ["BEGIN", f"SET LOCAL search_path = {PINNED_SEARCH_PATH}", prologue]
    dialect = run.conn.dialect
    compiled = [
        statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True}) for statement in statements
    ]
    work: list[Statement] = [(str(each), each.params) for each in compiled]
    try:
        cursors = send_at_once(run, [*opening, *work, "COMMIT"])
    except BaseException:
        with contextlib.suppress(Exception):
            run.driver_execute("ROLLBACK")
        raise
    results = [cursor.fetchall() if cursor.description else cursor.rowcount for cursor in cursors]
    run.take(dict(zip(names, results[2][0], strict=True)), sent, take_lock=False)
    return results[len(opening) : -1]


def send_at_once(run: RunConnection, statements: Sequence[Statement]) -> list[Any]:
    """Send every statement, then read every answer: one round trip; their cursors. Raises
    the first error the server gave (not psycopg's 'pipeline aborted' for those it
    skipped): the open transaction is then aborted (undo_work)."""
    import psycopg

    driver = run.conn.connection.driver_connection
    assert driver is not None
    cursors, first_error = [], None
    try:
        with driver.pipeline():
            for statement in statements:
                cursor = driver.cursor()
                try:
                    if isinstance(statement, str):
                        cursor.execute(statement)
                    else:
                        cursor.execute(statement[0], statement[1])
                except psycopg.Error as exc:
                    first_error = exc
                    break
                cursors.append(cursor)
    except psycopg.Error as exc:
        first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return cursors
