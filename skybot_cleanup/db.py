"""Connections: URL normalisation, engines, per-transaction settings, locks, bound tables.

SQL that depends on the dialect lives here, so the task code reads the same on
PostgreSQL and on SQLite.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import quoted_name

from skybot_cleanup.errors import ConfigError, LockHeld
from skybot_cleanup.settings import BaseCleanupSettings, env_name
from skybot_cleanup.tasks import TABLES

# Query parameters Prisma understands and libpq rejects ("invalid URI query parameter").
PRISMA_ONLY_PARAMETERS = frozenset({
    "schema", "connection_limit", "pool_timeout", "pgbouncer", "socket_timeout",
    "statement_cache_size", "sslaccept", "sslidentity",
    "max_connection_lifetime", "max_idle_connection_lifetime",
})

_TYPES = {"timestamp": sa.DateTime, "text": sa.Text, "integer": sa.Integer, "boolean": sa.Boolean}


@dataclass(frozen=True)
class DatabaseTarget:
    """A normalised URL plus what its Prisma parameters meant."""

    url: sa.URL
    schema: str | None
    pgbouncer: bool = False
    password: str | None = field(default=None, repr=False)

    @property
    def is_postgres(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    @property
    def display(self) -> str:
        return self.url.render_as_string(hide_password=True)


def parse_database_url(raw: str | None, schema_override: str | None = None) -> DatabaseTarget:
    if not raw:
        raise ConfigError(
            "no database URL: set DATABASE_URL or SKYBOT_CLEANUP_DATABASE_URL, or pass --database-url"
        )
    try:
        url = sa.make_url(raw.strip())
    except Exception:
        # The message of the parser would echo the URL, password and all.
        raise ConfigError("DATABASE_URL is not a valid database URL") from None
    scheme = url.drivername.split("+")[0]
    if scheme == "sqlite":
        return DatabaseTarget(url=url, schema=None)
    if scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            f"DATABASE_URL scheme {scheme!r} is not supported: use postgres://, postgresql:// or sqlite:///"
        )
    query = dict(url.query)
    schema = schema_override or _single(query.get("schema")) or None
    pgbouncer = _single(query.get("pgbouncer", "")).lower() == "true"
    if schema is not None and not _is_identifier(schema):
        raise ConfigError("the URL's ?schema= is not a valid schema name")
    url = url.set(
        # Explicit driver: a bare postgresql:// means psycopg2 in SQLAlchemy 2.0.
        drivername="postgresql+psycopg",
        query={k: v for k, v in query.items() if k not in PRISMA_ONLY_PARAMETERS},
    )
    return DatabaseTarget(url=url, schema=schema, pgbouncer=pgbouncer, password=url.password)


def _single(value: Any) -> str:
    if isinstance(value, tuple):
        return value[-1] if value else ""
    return value or ""


def _is_identifier(name: str) -> bool:
    import re

    from skybot_cleanup.settings import IDENTIFIER_PATTERN

    return re.match(IDENTIFIER_PATTERN, name) is not None


def create_engine(target: DatabaseTarget, settings: BaseCleanupSettings, label: str) -> Engine:
    """One short-lived engine per run: no pool, bounded connect, no parameters in errors."""
    if target.is_postgres:
        connect_args: dict[str, Any] = {
            "connect_timeout": settings.connect_timeout_s,
            "application_name": f"{settings.application_name}:{label}"[:63],
        }
        if target.pgbouncer:
            # Transaction pooling cannot keep server-side prepared statements.
            connect_args["prepare_threshold"] = None
        return sa.create_engine(target.url, poolclass=NullPool, hide_parameters=True,
                                connect_args=connect_args)

    # sqlite3 opens transactions lazily and in DEFERRED mode; we want the write
    # lock up front (BEGIN IMMEDIATE) so two runs serialise instead of deadlocking.
    engine = sa.create_engine(target.url, poolclass=NullPool, hide_parameters=True,
                              connect_args={"timeout": settings.lock_timeout_ms / 1000})

    @sa.event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        mode = "DEFERRED" if conn.get_execution_options().get("read_only") else "IMMEDIATE"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def lock_key(task_name: str) -> str:
    return f"skybot-cleanup:{task_name}"


def set_local_timeouts(conn: Connection, settings: BaseCleanupSettings, label: str) -> None:
    """Transaction-local settings (set_config(..., true)): nothing leaks into a pooled connection."""
    if conn.dialect.name != "postgresql":
        return
    conn.execute(
        sa.text("SELECT set_config('application_name', :app, true),"
                " set_config('lock_timeout', :lock_timeout, true),"
                " set_config('statement_timeout', :statement_timeout, true)"),
        {"app": f"{settings.application_name}:{label}"[:63],
         "lock_timeout": str(settings.lock_timeout_ms),
         "statement_timeout": str(settings.statement_timeout_ms)},
    )


@contextmanager
def transaction(engine: Engine, settings: BaseCleanupSettings, *, label: str,
                lock: str | None = None, read_only: bool = False, hold: bool = False) -> Iterator[Connection]:
    """A transaction with our timeouts set locally, optionally holding a run lock.

    The lock is transaction-scoped (pg_try_advisory_xact_lock): it dies with the
    transaction or the connection, whatever happens to this process, and works
    through PgBouncer in transaction mode, where session locks leak. `hold` marks
    a transaction that only holds the lock while other connections work.
    """
    with engine.connect() as conn:
        if hold and engine.dialect.name == "sqlite":
            # SQLite's only lock is the database write lock: holding it for the
            # run would block the batches themselves. Each batch serialises alone.
            yield conn
            return
        if read_only:
            conn = conn.execution_options(read_only=True)
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    if read_only:
                        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                    set_local_timeouts(conn, settings, label)
                    if hold:
                        # Idle between batches by design; a server-wide idle timeout
                        # must not end it (and it holds no snapshot, so no vacuum harm).
                        conn.exec_driver_sql(
                            "SELECT set_config('idle_in_transaction_session_timeout', '0', true)")
                    if lock and not conn.scalar(
                        sa.text("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))"),
                        {"key": lock_key(lock)},
                    ):
                        raise LockHeld(f"another {lock} run holds the lock; skipped")
                yield conn
        except sa.exc.OperationalError as exc:
            # SQLite has no advisory locks: the write lock taken by BEGIN IMMEDIATE
            # is the run lock, and "locked" after busy_timeout means someone holds it.
            if engine.dialect.name == "sqlite" and "database is locked" in str(exc.orig):
                raise LockHeld(f"the SQLite database is locked by another writer; {label} skipped") from None
            raise


def confirm_lock(holder: Connection) -> None:
    """Raise (a transient connection error) if the lock-holding connection is gone."""
    if holder.dialect.name == "postgresql":
        holder.exec_driver_sql("SELECT 1")


def delete_batch(conn: Connection, table: sa.Table, due, walk: sa.Column, low_water, limit: int):
    """Delete up to `limit` due rows, lowest `walk` first; return (count, highest walk value).

    PostgreSQL: the rows are picked by the walk column's index from the low-water
    mark on (never re-reading what earlier batches deleted), locked with SKIP
    LOCKED (rows the app holds are left for a later run), deleted by ctid (a TID
    scan, the cheapest way back to a row), and only the count and the highest
    value come back to Python. `due` is checked again on delete.
    """
    picked = sa.select(sa.literal_column("ctid")).select_from(table).where(due)
    if low_water is not None:
        picked = picked.where(walk >= low_water)
    picked = picked.order_by(walk).limit(limit)
    if conn.dialect.name == "postgresql":
        picked = picked.with_for_update(skip_locked=True)
        deleted = (
            sa.delete(table)
            .where(sa.literal_column("ctid") == sa.func.any(sa.func.array(picked.scalar_subquery())))
            .where(due)
            .returning(walk.label("walked"))
            .cte("deleted")
        )
        count, highest = conn.execute(sa.select(sa.func.count(), sa.func.max(deleted.c.walked))).one()
        return count, highest
    # SQLite (demo and tests): rowid plays ctid's part; it has no row locks to skip.
    picked = picked.with_only_columns(sa.literal_column("rowid"))
    walked = conn.execute(sa.delete(table).where(sa.literal_column("rowid").in_(picked.scalar_subquery()))
                          .returning(walk)).scalars().all()
    return len(walked), max(walked, default=None)


def bind_table(conn: Connection, settings: BaseCleanupSettings, schema: str | None,
               table_key: str) -> tuple[sa.Table, dict[str, sa.Column]]:
    """The configured table as SQLAlchemy Core objects, after checking it exists.

    Names are always quoted identifiers (never pasted into SQL), and a missing
    table or column is a configuration error naming the setting to fix.
    """
    spec = TABLES[table_key]
    table_setting = f"{table_key}_table"
    name = getattr(settings, table_setting)
    inspector = sa.inspect(conn)
    shown = f'"{schema}"."{name}"' if schema else f'"{name}"'
    if not inspector.has_table(name, schema=schema):
        raise ConfigError(f"table {shown} not found (setting {env_name(table_setting)})")
    existing = {column["name"] for column in inspector.get_columns(name, schema=schema)}
    columns: dict[str, sa.Column] = {}
    for logical, (_default, type_name) in spec.columns.items():
        column_setting = f"{table_key}_{logical}_column"
        column_name = getattr(settings, column_setting)
        if column_name not in existing:
            raise ConfigError(
                f'column "{column_name}" not found in table {shown} (setting {env_name(column_setting)})'
            )
        columns[logical] = sa.Column(quoted_name(column_name, quote=True), _TYPES[type_name]())
    table = sa.Table(quoted_name(name, quote=True), sa.MetaData(), *columns.values(),
                     schema=quoted_name(schema, quote=True) if schema else None)
    return table, {logical: table.c[column.name] for logical, column in columns.items()}
