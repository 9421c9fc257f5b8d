"""Counting rows cheaply: exact up to a cap, the planner's estimate past it, and a task's backlog."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from skybot_cleanup.db.catalog import BoundTable
from skybot_cleanup.db.reads import Pending, Reads

# Past this many rows a reported count is the planner's estimate, so a snapshot costs the
# same on a table of ten thousand rows or ten million.
COUNT_CAP = 10_000
# Planner settings under which a query ordered by an indexed column can only read that
# column's index, in order, whatever the statistics say: the index walk's transactions,
# and every count through a task's walk column.
INDEX_WALK_PLANNER = {"enable_seqscan": "off", "enable_bitmapscan": "off", "enable_sort": "off"}


def count_capped(
    conn: Connection,
    table: BoundTable,
    where: ColumnElement[bool],
    cap: int,
    order_by: ColumnElement[Any] | None = None,
) -> int:
    """How many rows match, counting no further than `cap` (an exact count could scan a
    whole backlog, and a progress figure does not need it). With `order_by`, counted
    through that column's index, in a transaction under INDEX_WALK_PLANNER (its prologue
    sets them): with stale statistics the planner would otherwise take any index the
    predicate touches ("revokedAt" IS NULL, say) and read every live row of the table to
    find a few due ones."""
    inner_query = sa.select(sa.literal(1)).select_from(table.table).where(where)
    if order_by is not None and conn.dialect.name == "postgresql":
        inner_query = inner_query.order_by(order_by)
    inner = inner_query.limit(cap).subquery()
    return int(conn.scalar(sa.select(sa.func.count()).select_from(inner)) or 0)


def estimate_rows(conn: Connection, table: BoundTable, where: ColumnElement[bool]) -> int:
    """The planner's estimate of the rows matching `where` (PostgreSQL): no scan at all."""
    compiled = sa.select(sa.literal(1)).select_from(table.table).where(where).compile(conn)
    plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar()
    return int(plan[0]["Plan"]["Plan Rows"]) if plan else 0


@dataclass
class Count:
    value: int
    estimated: bool = False  # past the cap: the planner's estimate


def capped(
    table: BoundTable, where: ColumnElement[bool], cap: int, order_by: ColumnElement[Any] | None = None
) -> sa.Select[Any]:
    """count_capped's statement."""
    inner_query = sa.select(sa.literal(1)).select_from(table.table).where(where)
    if order_by is not None:
        inner_query = inner_query.order_by(order_by)
    return sa.select(sa.func.count()).select_from(inner_query.limit(cap).subquery())


class CountReading:
    """A count through `reads` (one round trip with the rest of a report): exact up to
    `cap`, else the planner's estimate (one more round trip, for all the counts that need
    one), through `order_by`'s index as count_capped does (PostgreSQL)."""

    def __init__(
        self,
        reads: Reads,
        table: BoundTable,
        where: ColumnElement[bool],
        *,
        order_by: ColumnElement[Any] | None = None,
        cap: int = COUNT_CAP,
        also: sa.ColumnElement[Any] | None = None,
    ):
        self.table, self.where, self.cap = table, where, cap
        on_postgres = reads.run.on_postgres
        counted = capped(table, where, cap + 1, order_by if on_postgres else None).scalar_subquery()
        # `also`: a second figure of the same rows, read in the same statement (the oldest due).
        self.read = reads.add(sa.select(counted, also if also is not None else sa.null()))
        self.estimate: Pending | None = None
        self.on_postgres = on_postgres

    def needs_estimate(self, reads: Reads) -> None:
        """Past the cap: ask the planner (added to `reads`, to run with the others)."""
        if self.read.error is None and (self.read.scalar() or 0) > self.cap:
            statement = sa.select(sa.literal(1)).select_from(self.table.table).where(self.where)
            if self.on_postgres:
                self.estimate = reads.add(statement, explain=True)
            else:  # SQLite (demo, tests): no planner estimate, count it all
                self.estimate = reads.add(sa.select(sa.func.count()).select_from(self.table.table).where(self.where))

    @property
    def error(self) -> BaseException | None:
        return self.read.error or (self.estimate.error if self.estimate is not None else None)

    def count(self) -> Count:
        exact = int(self.read.scalar() or 0)
        if self.estimate is None:
            return Count(exact)
        if not self.on_postgres:
            return Count(int(self.estimate.scalar() or 0))
        plan = self.estimate.scalar()
        return Count(max(int(plan[0]["Plan"]["Plan Rows"]) if plan else 0, self.cap + 1), estimated=True)

    @property
    def also(self) -> Any:
        return self.read.rows[0][1] if self.read.rows else None


def min_of(table: BoundTable, column: ColumnElement[Any], where: ColumnElement[bool]) -> ColumnElement[Any]:
    """The smallest value of `column` among the rows matching `where` (a scalar subquery)."""
    return sa.select(sa.func.min(column)).select_from(table.table).where(where).scalar_subquery()


def read_counts(reads: Reads, readings: list[CountReading]) -> None:
    """Run the reads, then the estimates the counts past their cap need."""
    reads.run_all()
    for reading in readings:
        reading.needs_estimate(reads)
    reads.run_all()
