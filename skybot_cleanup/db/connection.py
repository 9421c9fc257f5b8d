"""Connections: engines, and a run's chain of transactions with its session settings and lock.

Nothing here reads the tool's settings: callers pass a SessionSettings, so this layer
stays below the one module that reads configuration.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import registry as dialect_registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from skybot_cleanup.clock import naive_utc, utc_now
from skybot_cleanup.db.urls import DatabaseTarget
from skybot_cleanup.errors import ConfigError, LockHeld

# Every transaction resolves names here only, whatever the role's or the database's
# search_path says (CVE-2018-1058): no object planted in a schema on that path can stand
# in for a catalog function or operator the tool calls. pg_temp last, so a temporary
# table cannot shadow anything either; the tool's tables are always schema-qualified.
PINNED_SEARCH_PATH = "pg_catalog, pg_temp"
# How often the server checks that the run's client is still there while a statement
# runs, so a killed run's statement (and its lock) ends within about this long.
CLIENT_CHECK_INTERVAL_MS = 1000
# TID range scans (the physical walk) and client_connection_check_interval: PostgreSQL 14.
MIN_SERVER_VERSION = 140000
# The tool's lock_timeout never exceeds this share of the server's deadlock_timeout.
DEADLOCK_TIMEOUT_SHARE = 5
# Each physical standby the primary streams to (a walsender with no database: logical
# ones have one), as [name, replayed, behind, lag seconds]: its replay position and what
# it has yet to replay, in bytes of WAL. A standby has no standbys to read (and
# pg_current_wal_lsn() fails there): NULL. The positions are NULL to a role without
# pg_read_all_stats (or pg_monitor, or superuser).
STANDBYS_SQL = """(CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN (
    SELECT pg_catalog.json_agg(pg_catalog.json_build_array(
               coalesce(r.application_name, '') || '@' || coalesce(pg_catalog.host(r.client_addr), 'local')
               || '#' || r.pid,
               pg_catalog.pg_wal_lsn_diff(r.replay_lsn, '0/0')::bigint,
               pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), r.replay_lsn)::bigint,
               EXTRACT(EPOCH FROM r.replay_lag)::float8))
    FROM pg_catalog.pg_stat_replication r
    JOIN pg_catalog.pg_stat_activity a ON a.pid = r.pid AND a.datid IS NULL) END)"""


@dataclass(frozen=True)
class Standby:
    """One physical standby's row of pg_stat_replication, as the primary sees it."""

    name: str
    replayed: int | None  # replay position, in bytes of WAL (None: this role may not see it)
    behind: int | None  # WAL bytes not yet replayed
    lag_s: float | None  # replay_lag; None when caught up and idle (or not visible)

    @property
    def visible(self) -> bool:
        return self.replayed is not None


def standbys_of(value: Any) -> list[Standby]:
    return [Standby(str(name), replayed, behind, lag) for name, replayed, behind, lag in value or ()]


# Transaction-local counter of the due rows a batch left out because another
# transaction held them (db.batches.guard), reset by every transaction's prologue.
HELD_COUNTER = "skybot_cleanup.held"


class PinnedPathDialect(PGDialect_psycopg):
    """psycopg's dialect, without its start-up queries.

    SQLAlchemy asks a new connection for its version, default schema, isolation level
    and string escaping, a round trip each, before the first statement of ours. The
    server reports its version and standard_conforming_strings as it accepts the
    connection; the tool always names schemas, and begins its own transactions (the
    driver is in autocommit), so the rest is never needed. A cron job in another region
    than its database pays every round trip: these were four of a no-op run's 23. Nor
    can a query run before a transaction of ours pins search_path (a planted
    current_schema() would otherwise run there)."""

    supports_statement_cache = True  # as its parent: the subclass changes no SQL compilation

    def _get_server_version_info(self, connection: Connection) -> tuple[int, ...]:
        version = int(connection.connection.dbapi_connection.info.server_version)  # type: ignore[union-attr]
        return (version // 10000, version % 10000)

    def _get_default_schema_name(self, connection: Connection) -> str:
        return ""  # never consulted: every table the tool names carries its schema

    def get_default_isolation_level(self, dbapi_conn: Any) -> Any:
        return "READ COMMITTED"

    def _set_backslash_escapes(self, connection: Connection) -> None:
        info = connection.connection.dbapi_connection.info  # type: ignore[union-attr]
        self._backslash_escapes = info.parameter_status("standard_conforming_strings") == b"off"


dialect_registry.register("postgresql.skybot_psycopg", __name__, "PinnedPathDialect")


@dataclass(frozen=True)
class SessionSettings:
    """What every connection and transaction of a run is given (from the settings)."""

    application_name: str
    connect_timeout_s: int
    lock_timeout_ms: int
    statement_timeout_ms: int
    idle_timeout_ms: int


def create_engine(target: DatabaseTarget, session: SessionSettings, label: str) -> Engine:
    """One short-lived engine per command: no pool, bounded connect, no parameters in
    errors, and autocommit at the driver: RunConnection issues BEGIN and COMMIT itself."""
    if target.is_postgres:
        import psycopg

        def connect() -> psycopg.Connection[Any]:
            conn = psycopg.connect(
                target.conninfo,
                connect_timeout=session.connect_timeout_s,
                application_name=application_name(session, label),
                # Never server-side prepared statements: under PgBouncer's transaction
                # pooling they outlive us on the server connection and break the next
                # client ("prepared statement _pg3_0 already exists"); a short-lived
                # process gains nothing from them.
                prepare_threshold=None,
            )
            # The server reports its version as it accepts the connection: an old server
            # is refused here, before any statement that only 14 and later understand.
            version = conn.info.server_version
            if version < MIN_SERVER_VERSION:
                conn.close()
                raise ConfigError(unsupported_server(version))
            return conn

        # pool_reset_on_return=None: closing must not send a ROLLBACK of its own, which
        # would end the run's transaction without its unlock (see RunConnection).
        # use_native_hstore=False: no type lookup through the unpinned path at start-up.
        return sa.create_engine(
            "postgresql+skybot_psycopg://",
            creator=connect,
            poolclass=NullPool,
            hide_parameters=True,
            isolation_level="AUTOCOMMIT",
            pool_reset_on_return=None,
            use_native_hstore=False,
        )
    # sqlite3's timeout is its busy timeout: how long BEGIN IMMEDIATE waits for the write lock.
    return sa.create_engine(
        target.conninfo,
        poolclass=NullPool,
        hide_parameters=True,
        isolation_level="AUTOCOMMIT",
        connect_args={"timeout": max(session.lock_timeout_ms, 1) / 1000},
    )


def unsupported_server(version: int) -> str:
    shown = f"{version // 10000}.{version % 10000}" if version >= 100000 else str(version)
    return (
        f"PostgreSQL {shown} is not supported: the tool needs PostgreSQL {MIN_SERVER_VERSION // 10000} or later "
        "(TID range scans, client_connection_check_interval); upgrade the server, or keep the release that "
        "supported it (CHANGELOG.md)"
    )


def application_name(session: SessionSettings, label: str) -> str:
    return f"{session.application_name}:{label}"[:63]


def lock_key(name: str) -> str:
    return f"skybot-cleanup:{name}"


def sql_literal(value: str) -> str:
    """A SQL string literal for the few fixed values sent without parameters (which
    keeps them on the simple protocol: no portal, so no snapshot held while idle)."""
    return "'" + value.replace("'", "''") + "'"


class RunConnection:
    """One connection for a whole run, as a chain of transactions.

    On PostgreSQL every transaction pins search_path and sets application_name,
    lock_timeout, statement_timeout (never past the run's deadline),
    idle_in_transaction_session_timeout and client_connection_check_interval locally,
    in the message that begins it. A run that deletes takes the task's advisory lock in
    its first transaction, at session level, so that it holds across every COMMIT AND
    CHAIN between batches (a transaction-level lock would be free for an instant at
    each commit). The run is in a transaction from its first statement to its last, so
    under PgBouncer's transaction pooling the server connection stays pinned to it, and
    the unlock travels in the same message as the final COMMIT or ROLLBACK: it can never
    be left behind on a pooled connection. If the client dies or freezes instead, the
    server ends the session (a lost client, noticed within the check interval even
    mid-statement, or the idle timeout) and the lock with it; PgBouncer closes a server
    connection whose client vanished mid-transaction.

    Each transaction also reads the server's clock: `server_now` and the host's clock
    at the same moment, `host_now`.

    On SQLite, BEGIN IMMEDIATE (the database write lock) plays the lock's part.
    """

    def __init__(
        self,
        conn: Connection,
        session: SessionSettings,
        label: str,
        *,
        lock: str | None = None,
        read_only: bool = False,
        deadline: float | None = None,
        planner: Mapping[str, str] | None = None,
        watch_standbys: bool = False,
    ):
        self.conn = conn
        self.session = session
        self.label = label
        self.lock = lock
        self.read_only = read_only
        # time.monotonic() by which every statement must have ended (--max-runtime)
        self.deadline = deadline
        self.on_postgres = conn.dialect.name == "postgresql"
        self.in_transaction = False
        self.locked = False  # PostgreSQL: this session holds the task's lock
        self.server_now: datetime | None = None
        self.host_now: datetime | None = None
        self.snapshot_xmax = 0  # the next transaction id when this transaction began
        # When the server's postmaster started: the same on a new connection means the same
        # server, still running, so what an earlier connection committed is there.
        self.server_started: datetime | None = None
        # Due rows the last committed transaction left out as held (HELD_COUNTER).
        self.held_in_last_transaction = 0
        # lock_timeout and idle_in_transaction_session_timeout as the first transaction
        # derived them from the server's settings: later ones reuse the values.
        self._derived: dict[str, str] = {}
        # Planner settings of the transactions to come (a batch walk's: db.batches).
        self.planner: Mapping[str, str] = planner or {}
        # Every transaction reads the physical standbys' replay positions (replica pacing).
        self.watch_standbys = watch_standbys and self.on_postgres
        self.standbys: list[Standby] = []
        self.read_at = 0.0  # time.monotonic() of the last reading of the server's clock and standbys
        self.round_trip_s: float | None = None  # the last prologue's, as a measure of latency

    def statement_timeout_ms(self) -> int:
        """The configured statement_timeout, never longer than the time left (0: none)."""
        timeout = self.session.statement_timeout_ms
        if self.deadline is None:
            return timeout
        left = max(1, int((self.deadline - time.monotonic()) * 1000))
        return left if timeout == 0 else min(timeout, left)

    # PostgreSQL: the statement run at the start of every transaction of the chain. It
    # runs after the path is pinned, and qualifies every call all the same.
    def prologue(self, take_lock: bool) -> tuple[list[str], str]:
        session = self.session
        idle = session.idle_timeout_ms
        # Never weaken a DBA's shorter idle timeout: take the smaller of the two.
        idle_sql = (
            f"(SELECT CASE WHEN setting::bigint > 0 AND setting::bigint < {idle} THEN setting "
            f"ELSE '{idle}' END FROM pg_catalog.pg_settings WHERE name = 'idle_in_transaction_session_timeout')"
        )
        # Below the server's deadlock_timeout, so that a wait of the tool's ends before the
        # deadlock detector could pick anyone: the tool gives way, the app never fails.
        lock_sql = (
            f"(SELECT CASE WHEN {session.lock_timeout_ms} > 0 AND {session.lock_timeout_ms} < setting::bigint / "
            f"{DEADLOCK_TIMEOUT_SHARE} THEN '{session.lock_timeout_ms}' ELSE (setting::bigint / "
            f"{DEADLOCK_TIMEOUT_SHARE})::text END FROM pg_catalog.pg_settings WHERE name = 'deadlock_timeout')"
        )
        settings = {
            "application_name": sql_literal(application_name(session, self.label)),
            "lock_timeout": self._derived.get("lock_timeout", lock_sql),
            "statement_timeout": f"'{self.statement_timeout_ms()}'",
            "idle_in_transaction_session_timeout": self._derived.get("idle_in_transaction_session_timeout", idle_sql),
            "client_connection_check_interval": f"'{CLIENT_CHECK_INTERVAL_MS}'",
            HELD_COUNTER: "'0'",
            **{name: sql_literal(value) for name, value in self.planner.items()},
        }
        columns = {
            f"set {name}": f"pg_catalog.set_config({sql_literal(name)}, {value}, true)"
            for name, value in settings.items()
        }
        columns |= {
            "read_only": "pg_catalog.pg_is_in_recovery() "
            "OR pg_catalog.current_setting('transaction_read_only')::boolean",
            "server_now": "pg_catalog.timezone('UTC', pg_catalog.clock_timestamp())",
            "version": "pg_catalog.current_setting('server_version_num')::integer",
            "snapshot_xmax": "pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text::bigint",
            "server_started": "pg_catalog.pg_postmaster_start_time()",
        }
        if self.watch_standbys:
            columns["standbys"] = STANDBYS_SQL
        if take_lock:
            key = sql_literal(lock_key(str(self.lock)))
            columns["locked"] = f"pg_catalog.pg_try_advisory_lock(pg_catalog.hashtextextended({key}, 0::bigint))"
        return list(columns), "SELECT " + ", ".join(columns.values())

    def driver_execute(self, sql: str) -> Any:
        """Straight to psycopg, without parameters: its simple protocol, so several
        statements travel in one message and no portal (snapshot) is left open."""
        driver = self.conn.connection.driver_connection
        assert driver is not None
        return driver.execute(sql)

    def _read_held(self, cursor: Any) -> None:
        """The held-row count of the transaction that just ended, read in its last message."""
        self.held_in_last_transaction = int(cursor.fetchone()[0] or 0)
        cursor.nextset()

    def _send(self, command: str, take_lock: bool = False) -> None:
        """`command` (BEGIN, COMMIT AND CHAIN), the pinned path, the prologue and a
        savepoint in one message. Any error aborts the transaction; inside the savepoint
        it only undoes the batch."""
        sent = time.monotonic()
        names, prologue = self.prologue(take_lock)
        ending = command.startswith("COMMIT")
        read_held = f"SELECT pg_catalog.current_setting('{HELD_COUNTER}', true); " if ending else ""
        cursor = self.driver_execute(
            f"{read_held}{command}; SET LOCAL search_path = {PINNED_SEARCH_PATH}; {prologue}; SAVEPOINT work"
        )
        if ending:
            self._read_held(cursor)
        while cursor.description is None and cursor.nextset():
            pass
        self.in_transaction = True
        self.take(dict(zip(names, cursor.fetchone() or (), strict=True)), sent, take_lock)

    def take(self, row: dict[str, Any], sent: float, take_lock: bool) -> None:
        """What a prologue read: the settings it derived, the lock, the clocks, the standbys."""
        for name in ("lock_timeout", "idle_in_transaction_session_timeout"):
            self._derived.setdefault(name, sql_literal(str(row[f"set {name}"])))
        if take_lock:
            self.locked = bool(row["locked"])  # first: whatever is raised next, the unlock must follow
        # The host's clock halfway through the round trip: the moment the server read its own.
        self.read_at = time.monotonic()
        self.round_trip_s = self.read_at - sent
        self.host_now = naive_utc(utc_now() - timedelta(seconds=self.round_trip_s / 2))
        self.server_now = row["server_now"]
        if self.watch_standbys:
            self.standbys = standbys_of(row["standbys"])
        self.snapshot_xmax = int(row["snapshot_xmax"])
        self.server_started = row["server_started"]
        if row["version"] < MIN_SERVER_VERSION:  # behind a pooler that reports its own version
            raise ConfigError(unsupported_server(row["version"]))
        if row["read_only"] and not self.read_only:
            raise ConfigError(
                "the database is read-only (a hot standby, or default_transaction_read_only is on): point "
                "DATABASE_URL at the primary, or add target_session_attrs=read-write"
            )
        if take_lock and not self.locked:
            raise LockHeld(f"another {self.lock} run holds the lock; skipped")

    def begin(self) -> None:
        if self.on_postgres:
            self._send("BEGIN READ ONLY" if self.read_only else "BEGIN", take_lock=bool(self.lock) and not self.locked)
            return
        try:
            self.conn.exec_driver_sql("BEGIN DEFERRED" if self.read_only else "BEGIN IMMEDIATE")
        except sa.exc.OperationalError as exc:
            # SQLite has no advisory locks: the write lock taken by BEGIN IMMEDIATE is
            # the run lock, and "locked" after the busy timeout means someone holds it.
            if "database is locked" in str(exc.orig):
                raise LockHeld(f"the SQLite database is locked by another writer; {self.label} skipped") from None
            raise
        self.in_transaction = True

    def _end(self, command: str) -> None:
        """COMMIT or ROLLBACK, with the unlock in the same message. Sent by every run
        that locks, even when it does not know it holds the lock (a signal may have cut
        the BEGIN short): unlocking nothing is harmless, a lock left behind is not."""
        self.in_transaction = False
        if self.on_postgres and command == "COMMIT":
            cursor = self.driver_execute(
                f"SELECT pg_catalog.current_setting('{HELD_COUNTER}', true); {command}"
                + ("; SELECT pg_catalog.pg_advisory_unlock_all()" if self.lock else "")
            )
            self.locked = False
            self._read_held(cursor)
        elif self.on_postgres and self.lock:
            self.locked = False
            self.driver_execute(f"{command}; SELECT pg_catalog.pg_advisory_unlock_all()")
        else:
            self.conn.exec_driver_sql(command)

    def commit(self) -> None:
        if self.in_transaction:
            self._end("COMMIT")

    def rollback(self) -> None:
        if not self.in_transaction:
            return
        if self.conn.invalidated:  # the connection is gone, and the transaction and lock with it
            self.in_transaction = self.locked = False
            self.conn.rollback()
            return
        # If even this fails, the connection is closed mid-transaction, which ends the
        # session's transaction and lock all the same (PgBouncer drops such a connection).
        with contextlib.suppress(Exception, KeyboardInterrupt):
            self._end("ROLLBACK")

    def commit_and_continue(self, planner: Mapping[str, str] | None = None) -> None:
        """Commit this transaction's work and start the next one, still holding the lock
        (with these planner settings, from now on)."""
        if planner is not None:
            self.planner = planner
        if self.on_postgres:
            self._send("COMMIT AND CHAIN")
        else:
            self.conn.exec_driver_sql("COMMIT")
            self.in_transaction = False
            self.begin()

    def read_standbys(self) -> None:
        """The standbys' replay positions again (one round trip: while a run waits for them)."""
        self.standbys = standbys_of(self.driver_execute(f"SELECT {STANDBYS_SQL}").fetchone()[0])
        self.read_at = time.monotonic()

    def undo_work(self) -> None:
        """Roll back what this transaction did since it began, keeping the lock
        (PostgreSQL only: SQLite has no row locks to run into)."""
        self.conn.exec_driver_sql("ROLLBACK TO SAVEPOINT work")


@contextmanager
def savepoint(conn: Connection, name: str) -> Iterator[None]:
    """What runs inside is undone alone when it fails; the transaction goes on."""
    conn.exec_driver_sql(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {name}")
        raise
    conn.exec_driver_sql(f"RELEASE SAVEPOINT {name}")


@contextmanager
def run_transaction(
    engine: Engine,
    session: SessionSettings,
    label: str,
    *,
    lock: str | None = None,
    read_only: bool = False,
    deadline: float | None = None,
    planner: Mapping[str, str] | None = None,
) -> Iterator[RunConnection]:
    """A RunConnection in a transaction, committed on success and rolled back otherwise."""
    with engine.connect() as conn:
        run = RunConnection(conn, session, label, lock=lock, read_only=read_only, deadline=deadline, planner=planner)
        run.begin()
        try:
            yield run
        except BaseException:
            run.rollback()
            raise
        run.commit()
