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
from collections.abc import Collection
from dataclasses import dataclass
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
    return tid_of(tid_text(page, item))


def tid_of(text: str) -> ColumnElement[str]:
    return sa.cast(sa.literal(text), TID())


def tid_text(page: int, item: int = 0) -> str:
    return f"({page},{item})"


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
    return [_not_listed(sa.bindparam("excluded", sorted(ctids), type_=ARRAY(sa.Text)))]


def delete_all(
    conn: Connection, table: BoundTable, due: ColumnElement[bool], snapshot_xmax: int, excluded: Collection[str]
) -> int:
    """Single-transaction mode: every due row nobody holds, in one statement (the held
    ones are counted in HELD_COUNTER, which the connection reads as it commits)."""
    statement = sa.delete(table.table).where(due, guard(due, snapshot_xmax, count=True), *_excluding(excluded))
    return int(conn.execute(statement).rowcount)


@dataclass(frozen=True)
class BatchOutcome:
    deleted: int
    picked: int  # rows the batch chose; as many as it was allowed: the batch was cut short
    last: Any  # where the batch stopped: the heap walk's last ctid, the index walk's last value


def heap_batch(table: BoundTable, due: ColumnElement[bool]) -> sa.Select[Any]:
    """The heap walk's batch, built once per run and run with `heap_batch_params`: up to
    `cap` due rows nobody holds on the pages after `after` and before `end_page`, in the
    heap's order, deleted in the same statement (one round trip). The LIMIT bounds every
    batch in rows whatever its span of pages holds, so no layout, statistic or earlier run
    can make one DELETE take more than it was allowed. Held rows met on the way are counted
    in HELD_COUNTER, read as the batch commits."""
    after = sa.cast(sa.bindparam("after", type_=sa.Text), TID())
    end = sa.cast(sa.bindparam("end_page", type_=sa.Text), TID())
    snapshot_xmax = sa.bindparam("snapshot_xmax", type_=sa.BigInteger)
    where = [ctid > after, ctid < end, due, guard(due, snapshot_xmax, count=True)]
    return _pick_and_delete(table, due, where, None, snapshot_xmax, count_held=True)


def index_batch(table: BoundTable, due: ColumnElement[bool], walk: ColumnElement[Any]) -> sa.Select[Any]:
    """The index walk's batch, built once per run and run with `index_batch_params`: the
    next `cap` due rows nobody holds in the walk column's order, from `low` on, deleted in
    the same statement. Rows the app holds are passed over (and counted once at the end)."""
    snapshot_xmax = sa.bindparam("snapshot_xmax", type_=sa.BigInteger)
    low = sa.bindparam("low", type_=walk.type)
    where = [due, guard(due, snapshot_xmax, count=False), sa.or_(low.is_(None), walk >= low)]
    return _pick_and_delete(table, due, where, walk, snapshot_xmax, count_held=False)


def _pick_and_delete(
    table: BoundTable,
    due: ColumnElement[bool],
    where: list[ColumnElement[bool]],
    order_by: ColumnElement[Any] | None,
    snapshot_xmax: BindParameter[int],
    *,
    count_held: bool,
) -> sa.Select[Any]:
    """WITH picked AS (SELECT ... LIMIT :cap), gone AS (DELETE ... WHERE ctid = ANY(picked)
    RETURNING 1) SELECT deleted, picked, last. The DELETE reads its ctids with a TID scan,
    which sorts them: rows are locked in heap order. On a table of several leaves a ctid
    names a row in each, so the DELETE also matches the leaf each row was picked from."""
    leaf = sa.cast(sa.literal_column("tableoid"), sa.BigInteger)
    multi_leaf = table.info.multi_leaf
    columns: list[ColumnElement[Any]] = [ctid.label("row_ctid")]
    if order_by is not None:
        columns.append(order_by.label("walk_value"))
    if multi_leaf:
        columns.append(leaf.label("leaf"))
    excluded = sa.bindparam("excluded", type_=ARRAY(sa.Text))
    picking = sa.select(*columns).select_from(table.table).where(*where, _not_listed(excluded))
    if order_by is not None:
        picking = picking.order_by(order_by)
    picked = picking.limit(sa.bindparam("cap", type_=sa.Integer)).cte("picked").prefix_with("MATERIALIZED")
    listed = sa.func.array(sa.select(picked.c.row_ctid).scalar_subquery())
    conditions = [ctid == sa.func.any(listed), due, guard(due, snapshot_xmax, count=count_held)]
    if multi_leaf:
        key = sa.cast(leaf, sa.Text).op("||")(":").op("||")(sa.cast(ctid, sa.Text))
        picked_key = sa.cast(picked.c.leaf, sa.Text).op("||")(":").op("||")(sa.cast(picked.c.row_ctid, sa.Text))
        conditions.append(key == sa.func.any(sa.func.array(sa.select(picked_key).scalar_subquery())))
    gone = sa.delete(table.table).where(*conditions).returning(sa.literal(1).label("one")).cte("gone")
    last = picked.c.walk_value if order_by is not None else picked.c.row_ctid
    return sa.select(
        sa.select(sa.func.count()).select_from(gone).scalar_subquery(),
        sa.select(sa.func.count()).select_from(picked).scalar_subquery(),
        sa.cast(sa.select(sa.func.max(last)).scalar_subquery(), sa.Text if order_by is None else last.type),
    )


def _not_listed(excluded: BindParameter[Any]) -> ColumnElement[bool]:
    """Rows found held by an earlier try of this batch (a race `guard` could not see)."""
    return sa.or_(excluded.is_(None), ctid != sa.func.all(sa.cast(excluded, ARRAY(TID()))))


def run_batch(conn: Connection, statement: sa.Select[Any], params: dict[str, Any]) -> BatchOutcome:
    """One batch statement with its parameters (`excluded`: ctids to leave out, or none)."""
    excluded = params.pop("excluded", None)
    row = conn.execute(statement, {**params, "excluded": sorted(excluded) if excluded else None}).one()
    return BatchOutcome(deleted=int(row[0]), picked=int(row[1]), last=row[2])


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
