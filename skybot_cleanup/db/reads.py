"""Several reads in one round trip, each failing alone.

A report (status, metrics, check) reads a dozen things: the newest runs, every task's
backlog, the measures. Sent one by one, each costs a round trip, and a cron job in
another region than its database pays 10 to 40 ms for each. Here they are sent at once
(psycopg's pipeline mode, in the open transaction); only if one fails (a privilege the
catalog did not show, a timeout) are they read again one at a time, each under a
savepoint, so that one failure costs only its own answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from skybot_cleanup.db.connection import RunConnection, savepoint

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
                answers = self.run.pipeline([_sql(read, self.run) for read in pending])
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
