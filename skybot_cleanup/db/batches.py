"""The statements that delete a slice of a task's due rows, and only due rows.

Three properties hold for every one of them, so that the app never fails or waits long
because of the tool:
- Rows are locked in heap order. A TID range scan reads pages in order, and a TID scan
  sorts its list of ctids, so a batch takes its row locks in the same order as the app's
  statements (an update by key, or of one user's rows through an index or a bitmap heap
  scan): two such statements cannot wait on each other in a cycle.
- No row another transaction holds is waited for. `guard` leaves out a due row whose
  xmax names a transaction still running (a lock, an update, a delete), and counts it;
  a race it cannot see waits at most the run's lock_timeout, which the connection keeps
  below the server's deadlock_timeout.
- No plan depends on the planner's estimates: the heap walk's scan is forced by the
  transaction's planner settings, and a list of ctids is built once per statement.

Only counts (and a batch's ctids) come back to Python, never rows.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.types import UserDefinedType

from skybot_cleanup.db.catalog import BoundTable
from skybot_cleanup.db.connection import HELD_COUNTER

# Planner settings of a heap walk's transaction (set in its prologue), so its plan never
# depends on statistics: it can only scan a TID range. (The index walk's: db.counts.)
HEAP_WALK_PLANNER = {"enable_seqscan": "off", "enable_indexscan": "off", "enable_bitmapscan": "off"}

_XID_WRAP = 2**32
_LOCK_CONTEXT = re.compile(r"while (?:deleting|locking|updating) tuple (\(\d+,\d+\)) in relation")


class TID(UserDefinedType[str]):
    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "tid"


class XID8(UserDefinedType[str]):
    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"


ctid: ColumnElement[str] = sa.literal_column("ctid", TID())
xmax_column: ColumnElement[Any] = sa.literal_column("xmax")


def tid(page: int, item: int = 0) -> ColumnElement[str]:
    return sa.cast(sa.literal(f"({page},{item})"), TID())


def page_of(ctid: str) -> int:
    return int(ctid.strip("()").split(",")[0])


def _held(snapshot_xmax: int | BindParameter[int]) -> ColumnElement[bool]:
    """The row's xmax names a transaction that is still running, or one that began after
    this statement's snapshot was taken (it may hold the row now). xmax is 32 bits and
    wraps: it is placed relative to the snapshot's xmax, the one xid8 known to be later."""
    xmax = (
        snapshot_xmax
        if isinstance(snapshot_xmax, BindParameter)
        else sa.bindparam("snapshot_xmax", snapshot_xmax, type_=sa.BigInteger)
    )
    raw = sa.cast(sa.cast(xmax_column, sa.Text), sa.BigInteger)
    back = ((xmax % _XID_WRAP) - raw + _XID_WRAP) % _XID_WRAP  # how far before the snapshot's xmax
    status = sa.func.pg_catalog.pg_xact_status(sa.cast(sa.cast(xmax - back, sa.Text), XID8()))
    return sa.or_(back == 0, back > _XID_WRAP // 2, sa.func.coalesce(status == "in progress", sa.false()))


def guard(due: ColumnElement[bool], snapshot_xmax: int | BindParameter[int], *, count: bool) -> ColumnElement[bool]:
    """False for a due row another transaction holds (counted in HELD_COUNTER when
    `count`); true otherwise. Cheap for the rows nobody ever touched (xmax 0)."""
    left_out: ColumnElement[bool] = sa.false()
    if count:
        current = sa.cast(sa.func.pg_catalog.current_setting(HELD_COUNTER), sa.Integer)
        left_out = sa.func.pg_catalog.set_config(HELD_COUNTER, sa.cast(current + 1, sa.Text), sa.true()).is_(None)
    return sa.case(
        (xmax_column == sa.literal_column("'0'::xid"), sa.true()),
        (sa.not_(due), sa.true()),  # not counted: the statement's own due condition rejects it
        (_held(snapshot_xmax), left_out),
        else_=sa.true(),
    )


def _excluding(ctids: Collection[str]) -> list[ColumnElement[bool]]:
    """Rows found held by an earlier try of this statement (a race `guard` could not see)."""
    if not ctids:
        return []
    listed = sa.cast(sa.bindparam("excluded", sorted(ctids), type_=ARRAY(sa.Text)), ARRAY(TID()))
    return [ctid != sa.func.all(listed)]


def delete_all(
    conn: Connection, table: BoundTable, due: ColumnElement[bool], snapshot_xmax: int, excluded: Collection[str]
) -> int:
    """Single-transaction mode: every due row nobody holds, in one statement (the held
    ones are counted in HELD_COUNTER, which the connection reads as it commits)."""
    statement = sa.delete(table.table).where(due, guard(due, snapshot_xmax, count=True), *_excluding(excluded))
    return int(conn.execute(statement).rowcount)


def heap_pages(conn: Connection, table: BoundTable) -> int:
    """The table's size in pages (its largest partition's: a TID range applies to each)."""
    return int(
        conn.scalar(
            sa.text("""
                SELECT coalesce((SELECT pg_catalog.max(pg_catalog.pg_relation_size(t.relid))
                                 FROM pg_catalog.pg_partition_tree(r.oid) t WHERE t.isleaf),
                                pg_catalog.pg_relation_size(r.oid))
                       / pg_catalog.current_setting('block_size')::bigint
                FROM (SELECT CAST(:oid AS pg_catalog.regclass) AS oid) r
            """),
            {"oid": table.shown},
        )
        or 0
    )


def page_range_delete(table: BoundTable, due: ColumnElement[bool]) -> sa.Delete:
    """The heap walk's batch, built once per run and run with `page_range_params`: due
    rows on pages [first, end), nobody's held ones (counted in HELD_COUNTER, which the
    connection reads as it commits). Built once, it is compiled once: a run of a thousand
    batches spends its time deleting, not building SQL."""
    first = sa.cast(sa.bindparam("first_page", type_=sa.Text), TID())
    end = sa.cast(sa.bindparam("end_page", type_=sa.Text), TID())
    snapshot_xmax = sa.bindparam("snapshot_xmax", type_=sa.BigInteger)
    return sa.delete(table.table).where(ctid >= first, ctid < end, due, guard(due, snapshot_xmax, count=True))


def delete_pages(
    conn: Connection, statement: sa.Delete, first: int, end: int, snapshot_xmax: int, excluded: Collection[str] = ()
) -> int:
    """Run `page_range_delete`'s statement on pages [first, end)."""
    if excluded:  # rare: rows a race made this batch wait for
        statement = statement.where(*_excluding(excluded))
    params = {"first_page": f"({first},0)", "end_page": f"({end},0)", "snapshot_xmax": snapshot_xmax}
    return int(conn.execute(statement, params).rowcount)


def pick(
    conn: Connection,
    table: BoundTable,
    where: ColumnElement[bool],
    limit: int,
    order_by: ColumnElement[Any] | None = None,
    excluded: Collection[str] = (),
    *,
    partitioned: bool = False,
) -> list[tuple[str, Any]]:
    """At most `limit` rows' (ctid, order value): a batch of the index walk (in the
    index's order), or a capped batch of the heap walk. On a partitioned table a ctid
    names a row in each partition, so the value also carries the row's partition."""
    columns = [ctid, order_by if order_by is not None else sa.null()]
    if partitioned:
        columns.append(sa.cast(sa.literal_column("tableoid"), sa.BigInteger))
    query = sa.select(*columns).select_from(table.table).where(where, *_excluding(excluded))
    if order_by is not None:
        query = query.order_by(order_by)
    rows = conn.execute(query.limit(limit)).all()
    if partitioned:
        return [(str(row[0]), (row[1], int(row[2]))) for row in rows]
    return [(str(row[0]), row[1]) for row in rows]


def delete_ctids(
    conn: Connection,
    table: BoundTable,
    due: ColumnElement[bool],
    ctids: Sequence[str],
    snapshot_xmax: int,
    excluded: Collection[str] = (),
    *,
    picked: Sequence[tuple[str, Any]] = (),
) -> int:
    """Delete these rows, in heap order, if they are still due and nobody holds them. On a
    partitioned table, only in the partition each was picked from (pick's values)."""
    listed = sa.cast(sa.bindparam("ctids", list(ctids), type_=ARRAY(sa.Text)), ARRAY(TID()))
    conditions = [ctid == sa.func.any(listed), due, guard(due, snapshot_xmax, count=False), *_excluding(excluded)]
    if table.info.partitioned:
        keys = [f"{value[1]}:{row_ctid}" for row_ctid, value in picked]
        key = sa.cast(sa.literal_column("tableoid"), sa.BigInteger).op("||")(":").op("||")(sa.cast(ctid, sa.Text))
        conditions.append(key == sa.func.any(sa.bindparam("keys", keys, type_=ARRAY(sa.Text))))
    return int(conn.execute(sa.delete(table.table).where(*conditions)).rowcount)


def held_tuple(exc: BaseException) -> str | None:
    """The ctid a lock timeout waited for (PostgreSQL names it in the error's context),
    or None when it waited for something else (a table lock)."""
    diag = getattr(getattr(exc, "orig", exc), "diag", None)
    match = _LOCK_CONTEXT.search(getattr(diag, "context", None) or "")
    return match.group(1) if match else None


def delete_rowids(conn: Connection, table: BoundTable, due: ColumnElement[bool], limit: int) -> int:
    """SQLite (the demo, tests): a batch by rowid. Its write lock is the run lock, so no
    row is ever held by someone else."""
    rowid: ColumnElement[Any] = sa.literal_column("rowid")
    picked = sa.select(rowid).select_from(table.table).where(due).limit(limit).scalar_subquery()
    return int(conn.execute(sa.delete(table.table).where(rowid.in_(picked), due)).rowcount)
