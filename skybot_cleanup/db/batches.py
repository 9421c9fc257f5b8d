"""The batch statements: each deletes one bounded slice of a task's due rows.

Only counts come back to Python, never rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from skybot_cleanup.db.catalog import BoundTable


@dataclass(frozen=True)
class LowWater:
    """Where the next batch starts on the walk column: at `value`, or just past it."""

    value: Any = None
    exclusive: bool = False

    def clause(self, walk: ColumnElement[Any]) -> ColumnElement[bool]:
        if self.value is None:
            return sa.true()
        return cast("ColumnElement[bool]", walk > self.value if self.exclusive else walk >= self.value)


def batch_end(
    conn: Connection, table: BoundTable, walk: ColumnElement[Any], low: LowWater, rows: int, below: datetime | None
) -> Any:
    """The walk value `rows` rows past the low-water mark (an index-only scan of the
    walk column), or None when fewer rows are left: the end of the next batch."""
    query = sa.select(walk).select_from(table.table).where(low.clause(walk))
    if below is not None:
        query = query.where(walk < below)
    return conn.scalar(query.order_by(walk).offset(rows).limit(1))


def delete_range(
    conn: Connection, table: BoundTable, due: ColumnElement[bool], walk: ColumnElement[Any], low: LowWater, end: Any
) -> int:
    """Delete the due rows from the low-water mark up to (not including) `end`: one
    index range scan, each row visited once, nothing returned but the count."""
    statement = sa.delete(table.table).where(due, low.clause(walk))
    if end is not None:
        statement = statement.where(walk < end)
    return int(conn.execute(statement).rowcount)


def delete_ties(conn: Connection, table: BoundTable, chunk: ColumnElement[bool], rows: int, exclude: set[Any]) -> int:
    """Delete up to `rows` rows of `chunk` (due rows sharing one walk value, when there
    are more than a batch of them: a mass revocation writes one "revokedAt").

    By primary key, not ctid: on a partitioned table a ctid names a row in every
    partition, so `ctid = ANY(...)` would take up to a batch per partition."""
    key = table.columns["id"]
    picked = sa.select(key).select_from(table.table).where(chunk, *_excluding(conn, key, exclude)).limit(rows)
    return int(conn.execute(sa.delete(table.table).where(key.in_(picked.scalar_subquery()), chunk)).rowcount)


def ids_where(
    conn: Connection, table: BoundTable, where: ColumnElement[bool], rows: int, exclude: set[Any] | None = None
) -> list[Any]:
    """The primary keys of at most `rows` rows: a batch to redo around rows the app holds."""
    key = table.columns["id"]
    query = sa.select(key).select_from(table.table).where(where, *_excluding(conn, key, exclude or set()))
    return list(conn.scalars(query.order_by(key).limit(rows)))


def delete_ids(conn: Connection, table: BoundTable, due: ColumnElement[bool], ids: list[Any]) -> int:
    key = table.columns["id"]
    return int(conn.execute(sa.delete(table.table).where(_any(conn, key, ids), due)).rowcount)


def _any(conn: Connection, key: ColumnElement[Any], ids: list[Any] | set[Any]) -> ColumnElement[bool]:
    """key = ANY(array) on PostgreSQL: one parameter, however many ids."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        return key == sa.func.any(sa.bindparam("ids", list(ids), type_=ARRAY(key.type), unique=True))
    return key.in_(list(ids))


def _excluding(conn: Connection, key: ColumnElement[Any], ids: set[Any]) -> list[ColumnElement[bool]]:
    return [sa.not_(_any(conn, key, ids))] if ids else []
