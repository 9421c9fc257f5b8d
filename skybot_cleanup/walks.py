"""The walks a batched run takes through a task's due rows: one class each, owning its
cursor. Restarting a walk (on a new connection, after a failover) means making a new one:
a position in a walk means nothing on another connection.

- IndexWalk: few rows are due (fewer than an eighth of the table's pages): batches in the
  order of the task's indexed column.
- HeapWalk: a big backlog, or a task whose predicate has no index: the table's pages in
  order, a span of pages per batch, sized to hold about a batch of due rows.
- RowidWalk: SQLite (the demo, tests), by rowid.

Every batch is one statement (db.batches), bounded in rows by its LIMIT whatever its pages
hold; it locks rows in heap order and leaves the rows the app holds for the next run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import sqlalchemy as sa

from skybot_cleanup import db
from skybot_cleanup.errors import RowsTakenMidStatement, SqlState, sqlstate_of
from skybot_cleanup.logs import get_logger

# A batch that meets rows taken by the app after its snapshot is tried again without them
# this many times, then it is left for the next run: held rows never stall a run.
RACE_RETRIES = 3
# Rows a page may hold at the most, for a first batch on a table the planner knows nothing
# of: the batch is then small, and the next ones are sized by what it found.
MAX_ROWS_PER_PAGE = 200
# The index walk while fewer rows are due than this share of the table's pages; the heap
# walk past it (docs/benchmarks.md: where each is faster, by layout).
INDEX_WALK_SHARE_OF_PAGES = 1 / 8
# A span of pages that held no due row grows this much for the next batch, at the most:
# a stretch of live rows must not make one batch read the rest of the table.
SPAN_GROWTH = 4


class WalkKind(StrEnum):
    INDEX = "index"
    HEAP = "heap"
    ROWID = "rowid"


@dataclass(frozen=True)
class Remaining:
    rows: int
    exact: bool  # False: a count that stopped at its cap, or was cut short (at least this many)


class Walk:
    """One walk through the due rows on one connection. `batch(limit)` deletes up to
    `limit` rows and says how many; `committed(held)` takes what the server counted as
    the batch committed; `ended` once no due row is left ahead of it."""

    kind: ClassVar[WalkKind]
    # Planner settings of the walk's transactions (their prologue sets them).
    planner: ClassVar[Mapping[str, str]] = {}

    def __init__(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool]):
        self.run = run
        self.table = table
        self.due = due
        self.ended = False
        # Rows found held by an earlier try of a statement (a race the guard could not
        # see): left out of every later statement of this walk, and counted as remaining.
        self.excluded: set[str] = set()

    def batch(self, limit: int) -> int:
        raise NotImplementedError

    def committed(self, held: int) -> None:
        """The batch committed; `held`: due rows it left because the app held them."""

    def known_left(self) -> int:
        """Due rows the walk knows it left behind (a lower bound of what remains)."""
        return len(self.excluded)

    def remaining(self, cap: int) -> Remaining:
        """Due rows left when the walk stopped (ended or not), counted up to `cap`."""
        counted = db.count_capped(self.run.conn, self.table, self.due, cap)
        return Remaining(counted, counted < cap)

    def statement_with_retries(self, attempt: Callable[[], db.BatchOutcome]) -> db.BatchOutcome | None:
        """Run a batch; a lock timeout on a row the app took after the statement began
        undoes it, and it runs again without that row. None: the app kept taking rows."""
        for _ in range(RACE_RETRIES + 1):
            try:
                return attempt()
            except sa.exc.OperationalError as exc:
                note_race(self.run, exc, self.excluded)
        return None


def note_race(run: db.RunConnection, exc: sa.exc.OperationalError, excluded: set[str]) -> None:
    """A lock timeout on a row the app took after the statement began: undo the statement,
    and leave that row out of the next try. Anything else is raised."""
    held = db.held_tuple(exc) if sqlstate_of(exc) == SqlState.LOCK_NOT_AVAILABLE and run.on_postgres else None
    if held is None:
        raise exc
    run.undo_work()
    excluded.add(held)
    get_logger().info("batch_met_held_row", ctid=held)


class IndexWalk(Walk):
    """Batches of due rows in the walk column's order, from the last value reached on."""

    kind = WalkKind.INDEX
    planner = db.INDEX_WALK_PLANNER

    def __init__(
        self,
        run: db.RunConnection,
        table: db.BoundTable,
        due: sa.ColumnElement[bool],
        walk_column: sa.ColumnElement[Any],
    ):
        super().__init__(run, table, due)
        self.walk_column = walk_column
        self.statement = db.index_batch(table, due, walk_column)
        self.low: Any = None  # the walk column's value the next batch starts at (">=": ties may be left)

    def batch(self, limit: int) -> int:
        params = {"cap": limit, "low": self.low, "snapshot_xmax": self.run.snapshot_xmax}
        outcome = self.statement_with_retries(
            lambda: db.run_batch(self.run.conn, self.statement, {**params, "excluded": self.excluded})
        )
        if outcome is None:  # left for the next run, and counted in remaining
            self.ended = True
            return 0
        # Fewer than asked: none are left. None deleted of a full batch (all taken by the
        # app since they were picked): stop rather than pick them again and again.
        self.ended = outcome.picked < limit or outcome.deleted == 0
        if outcome.picked:
            self.low = outcome.last
        return outcome.deleted

    def remaining(self, cap: int) -> Remaining:
        """Through the walk column's index, as the batches went (the walk's planner settings)."""
        counted = db.count_capped(self.run.conn, self.table, self.due, cap, order_by=self.walk_column)
        return Remaining(counted, counted < cap)


class HeapWalk(Walk):
    """The table's pages in order, a span of pages per batch.

    The cursor is `after`, the ctid the next batch starts after. A batch covers the pages
    from there, `span` of them, and takes at most its limit of due rows: when it is cut
    short, on a plain table the next one starts right after the last row it took, so no
    row is read twice and the held ones it met are counted once. On a table of several
    leaves (partitions, inheritance children) a ctid names a row in each, so a batch cut
    short leaves its span to the next one, which covers it again, in every leaf; held rows
    are then counted by the batch that completes a span.
    """

    kind = WalkKind.HEAP
    planner = db.HEAP_WALK_PLANNER

    def __init__(self, run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool], batch_size: int):
        super().__init__(run, table, due)
        self.statement = db.heap_batch(table, due)
        self.pages = table.info.pages
        self.after = db.tid_text(0)  # no row has item 0: "after (0,0)" is the whole of page 0
        self.span = initial_span(table.info, batch_size)
        self.held = 0  # due rows held by the app, counted exactly up to `after`
        self.skipped: list[tuple[str, str]] = []  # spans the app kept taking rows from: (after, end)
        self._pending: tuple[str, int, bool] | None = None  # the last batch: its end, its start, cut short

    def batch(self, limit: int) -> int:
        first = db.page_of(self.after)
        end = min(first + max(self.span, 1), self.pages) if self.pages > first else first + 1
        end_tid = db.tid_text(end)
        params = {"after": self.after, "end_page": end_tid, "cap": limit, "snapshot_xmax": self.run.snapshot_xmax}
        outcome = self.statement_with_retries(
            lambda: db.run_batch(self.run.conn, self.statement, {**params, "excluded": self.excluded})
        )
        if outcome is None:
            self.skipped.append((self.after, end_tid))
            self._advance(end_tid, end)
            self._pending = None
            return 0
        cut = outcome.picked >= limit
        self._resize(first, end, outcome, cut, limit)
        if not cut:
            self._pending = (end_tid, end, False)
        elif not self.table.info.multi_leaf:
            self._pending = (str(outcome.last), end, True)
        elif outcome.deleted == 0:  # every row it picked was taken since: leave the span to the next run
            self.skipped.append((self.after, end_tid))
            self._pending = (end_tid, end, False)
        else:
            self._pending = (self.after, end, True)  # the same span again, in every leaf
        return outcome.deleted

    def committed(self, held: int) -> None:
        if self._pending is None:
            return
        after, end, cut = self._pending
        self._pending = None
        # A cut batch of a multi-leaf table is covered again: its held rows are counted then.
        if not (cut and self.table.info.multi_leaf):
            self.held += held
        if cut:
            self.after = after
        else:
            self._advance(after, end)

    def _advance(self, end_tid: str, end: int) -> None:
        self.after = end_tid
        self.ended = end >= self.pages

    def _resize(self, first: int, end: int, outcome: db.BatchOutcome, cut: bool, limit: int) -> None:
        """Pages for the next batch, as many as would have held `limit` due rows at the
        density just seen."""
        if cut and not self.table.info.multi_leaf:
            covered = db.page_of(str(outcome.last)) - first + 1
            self.span = max(1, round(covered * limit / max(outcome.picked, 1)))
        elif cut:
            self.span = max(1, (end - first) // 2)
        elif outcome.picked == 0:
            self.span = (end - first) * SPAN_GROWTH
        else:
            self.span = max(1, min((end - first) * SPAN_GROWTH, round((end - first) * limit / outcome.picked)))

    def known_left(self) -> int:
        return self.held + len(self.excluded)

    def remaining(self, cap: int) -> Remaining:
        """A walk to the end knows what it left: the held rows, the rows a race kept, the
        spans the app kept taking rows from (counted). Otherwise the rest is counted."""
        conn, table, due = self.run.conn, self.table, self.due
        known = self.known_left()
        for after, end in self.skipped:
            span = sa.and_(db.ctid > db.tid_of(after), db.ctid < db.tid_of(end), due)
            known += db.count_capped(conn, table, span, 10**9)
        if self.ended:
            return Remaining(known, True)
        rest = db.count_capped(conn, table, sa.and_(db.ctid > db.tid_of(self.after), due), cap)
        return Remaining(known + rest, rest < cap)


class RowidWalk(Walk):
    """SQLite: batches by rowid; its write lock is the run lock, so no row is ever held."""

    kind = WalkKind.ROWID

    def batch(self, limit: int) -> int:
        deleted = db.delete_rowids(self.run.conn, self.table, self.due, limit)
        self.ended = deleted < limit
        return deleted


def initial_span(info: db.TableInfo, batch_size: int) -> int:
    """Pages the first heap batch covers: as many as hold `batch_size` rows by the leaves'
    statistics (a guess the next batches correct; the batch's LIMIT bounds it anyway)."""
    per_page = max(info.rows_per_page or MAX_ROWS_PER_PAGE, 1.0)
    return max(1, round(batch_size / per_page))


def choose_walk(
    run: db.RunConnection,
    table: db.BoundTable,
    due: sa.ColumnElement[bool],
    walk_column: str | None,
    batch_size: int,
    log: Any,
) -> Walk | None:
    """In a run's first transaction (under the index walk's planner settings): the index
    walk when few rows are due (counted through the index, up to a cap: cheap whatever the
    backlog); the heap walk otherwise, and for a predicate no index serves or a table
    whose children's indexes are their own; None when nothing is due."""
    info = table.info
    if not run.on_postgres:
        return RowidWalk(run, table, due)
    if walk_column is None or info.shape is db.TableShape.INHERITED:
        # The heap, once a first due row shows there is anything to walk.
        log.debug("walk", walk=WalkKind.HEAP, pages=info.pages, shape=info.shape)
        return HeapWalk(run, table, due, batch_size) if db.count_capped(run.conn, table, due, 1) else None
    cap = max(1, int(info.pages * INDEX_WALK_SHARE_OF_PAGES))
    counted = db.count_capped(run.conn, table, due, cap, order_by=table.columns[walk_column])
    log.debug("walk", walk=WalkKind.INDEX if counted < cap else WalkKind.HEAP, due_counted=counted, pages=info.pages)
    if counted == 0:
        return None
    if counted < cap:
        return IndexWalk(run, table, due, table.columns[walk_column])
    return HeapWalk(run, table, due, batch_size)


def delete_in_one_statement(
    run: db.RunConnection, table: db.BoundTable, due: sa.ColumnElement[bool], excluded: set[str]
) -> int:
    """Single-transaction mode: every due row nobody holds, in one statement; the held
    ones are counted (read as it commits) and left for the next run. A row the app takes
    after the statement's snapshot makes it wait, at most its lock timeout, and it is
    redone without that row (added to `excluded`)."""
    if not run.on_postgres:
        return int(run.conn.execute(sa.delete(table.table).where(due)).rowcount)
    for _ in range(RACE_RETRIES + 1):
        try:
            return db.delete_all(run.conn, table, due, run.snapshot_xmax, excluded)
        except sa.exc.OperationalError as exc:
            note_race(run, exc, excluded)
    raise RowsTakenMidStatement(f"the app took due rows mid-statement {RACE_RETRIES + 1} times running")
