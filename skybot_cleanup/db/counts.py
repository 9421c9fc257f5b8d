"""Counting rows cheaply: exact up to a cap, the planner's estimate past it, and a task's backlog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from skybot_cleanup.db.catalog import BoundTable
from skybot_cleanup.registry import Task

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
    through that column's index: with stale statistics the planner would otherwise take
    any index the predicate touches ("revokedAt" IS NULL, say) and read every live row of
    the table to find a few due ones."""
    inner_query = sa.select(sa.literal(1)).select_from(table.table).where(where)
    if order_by is None or conn.dialect.name != "postgresql":
        inner = inner_query.limit(cap).subquery()
        return int(conn.scalar(sa.select(sa.func.count()).select_from(inner)) or 0)
    inner = inner_query.order_by(order_by).limit(cap).subquery()
    # The settings last for this count alone: rolling back to the savepoint restores the caller's.
    conn.exec_driver_sql("SAVEPOINT index_count")
    try:
        for name, value in INDEX_WALK_PLANNER.items():
            conn.exec_driver_sql(f"SET LOCAL {name} = {value}")
        return int(conn.scalar(sa.select(sa.func.count()).select_from(inner)) or 0)
    finally:
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT index_count")
        conn.exec_driver_sql("RELEASE SAVEPOINT index_count")


def estimate_rows(conn: Connection, table: BoundTable, where: ColumnElement[bool]) -> int:
    """The planner's estimate of the rows matching `where` (PostgreSQL): no scan at all."""
    compiled = sa.select(sa.literal(1)).select_from(table.table).where(where).compile(conn)
    plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar()
    return int(plan[0]["Plan"]["Plan Rows"]) if plan else 0


@dataclass
class Count:
    value: int
    estimated: bool = False  # past COUNT_CAP: the planner's estimate


def count(
    conn: Connection, table: BoundTable, where: ColumnElement[bool], order_by: ColumnElement[Any] | None = None
) -> Count:
    """Rows matching `where`: exact up to COUNT_CAP (through `order_by`'s index, see
    count_capped), else the planner's estimate."""
    exact = count_capped(conn, table, where, COUNT_CAP + 1, order_by)
    if exact <= COUNT_CAP or conn.dialect.name != "postgresql":
        if exact > COUNT_CAP:  # SQLite (demo, tests): no planner estimate, count it all
            return Count(int(conn.scalar(sa.select(sa.func.count()).select_from(table.table).where(where)) or 0))
        return Count(exact)
    return Count(max(estimate_rows(conn, table, where), COUNT_CAP + 1), estimated=True)


@dataclass
class Backlog:
    due: Count
    oldest_due_age_seconds: float


def task_backlog(conn: Connection, task: Task, table: BoundTable, cutoff: datetime) -> Backlog:
    """Rows due now and how long the oldest has been due, in seconds (0 when only rows
    due for another reason, such as used magic links, are due)."""
    due = task.due(table.columns, cutoff)
    oldest = conn.scalar(sa.select(sa.func.min(table.columns[task.age_column])).where(due))
    age = max(0.0, round((cutoff - oldest).total_seconds(), 3)) if oldest else 0.0
    walk = table.columns[task.walk_column] if task.walk_column else None
    return Backlog(count(conn, table, due, order_by=walk), age)
