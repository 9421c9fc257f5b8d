"""Connections: URL normalisation, engines, run transactions, locks, the catalog,
and the batch statements.

SQL that depends on the dialect lives here, so the task code reads the same on
PostgreSQL and on SQLite.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ColumnElement, quoted_name

from skybot_cleanup.errors import ConfigError, LockHeld
from skybot_cleanup.settings import IDENTIFIER_PATTERN, CleanupSettings, column_field, env_name, table_field
from skybot_cleanup.tasks import ColumnType, TableSpec

# Query parameters Prisma understands and libpq rejects ("invalid URI query parameter").
PRISMA_ONLY_PARAMETERS = frozenset(
    {
        "schema",
        "connection_limit",
        "pool_timeout",
        "pgbouncer",
        "socket_timeout",
        "statement_cache_size",
        "max_connection_lifetime",
        "max_idle_connection_lifetime",
    }
)
# Prisma's TLS parameters, which mean something else (or nothing) to libpq.
PRISMA_TLS_PARAMETERS = frozenset({"sslaccept", "sslcert", "sslidentity", "sslpassword"})


@dataclass(frozen=True)
class SqlType:
    """A registry column type: how the tool binds it, how Prisma creates it (the test and
    demo schema), and what PostgreSQL's format_type() must start with for the tool's
    comparisons to mean what they say."""

    bind: sa.types.TypeEngine[Any]
    ddl: sa.types.TypeEngine[Any]
    catalog: tuple[str, ...]


def _sql_types() -> dict[ColumnType, SqlType]:
    from sqlalchemy.dialects import postgresql

    return {
        # Prisma's DateTime: timestamp(3) without time zone, holding UTC.
        "timestamp": SqlType(
            sa.DateTime(),
            sa.DateTime().with_variant(postgresql.TIMESTAMP(precision=3), "postgresql"),
            ("timestamp without time zone", "timestamp("),
        ),
        "text": SqlType(sa.Text(), sa.Text(), ("text", "character varying")),
        "integer": SqlType(sa.Integer(), sa.Integer(), ("integer",)),
        "boolean": SqlType(sa.Boolean(), sa.Boolean(), ("boolean",)),
        "jsonb": SqlType(sa.JSON(), sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), ("jsonb", "json")),
    }


SQL_TYPES = _sql_types()


# -- URLs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseTarget:
    """Where to connect, normalised, plus what the URL's Prisma parameters meant."""

    kind: Literal["postgresql", "sqlite"]
    conninfo: str  # a libpq URI for psycopg, or a SQLAlchemy sqlite URL
    schema: str | None
    display: str  # for messages: the password masked
    secrets: tuple[str, ...] = field(default=(), repr=False)
    # Which database a spooled run belongs to: user and database name (host and port may
    # be what was wrong when it failed), or the file of a SQLite database.
    identity: str = ""

    @property
    def is_postgres(self) -> bool:
        return self.kind == "postgresql"


_AUTHORITY = re.compile(r"^(?:(?P<userinfo>[^/?]*)@)?(?P<hosts>[^@/?]*)(?P<path>/[^?]*)?(?:\?(?P<query>.*))?$", re.S)


def parse_database_url(raw: str | None, schema_override: str | None = None) -> DatabaseTarget:
    """A URL as Render, Prisma or libpq write it, made into what psycopg accepts.

    libpq parses the result itself, so every form it knows works: a socket directory
    as a percent-encoded host or ?host=, several hosts with target_session_attrs.
    """
    if not raw or not raw.strip():
        raise ConfigError("no database URL: set DATABASE_URL or SKYBOT_CLEANUP_DATABASE_URL, or pass --database-url")
    raw = raw.strip()
    scheme, sep, rest = raw.partition("://")
    scheme = scheme.lower().split("+")[0]
    if not sep:
        raise ConfigError("DATABASE_URL is not a valid database URL (expected scheme://...)")
    if scheme == "sqlite":
        path = sa.make_url(raw).database or ""
        return DatabaseTarget(
            kind="sqlite",
            conninfo=raw,
            schema=None,
            display=raw,
            identity=f"sqlite:{os.path.abspath(path) if path else ':memory:'}",
        )
    if scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            f"DATABASE_URL scheme {scheme!r} is not supported: use postgres://, postgresql:// or sqlite:///"
        )
    match = _AUTHORITY.match(rest)
    if match is None:
        raise ConfigError("DATABASE_URL is not a valid database URL")
    userinfo, hosts, path, query = (match.group(name) or "" for name in ("userinfo", "hosts", "path", "query"))
    # The userinfo ends at the last "@": a password with an unencoded "@" must not
    # spill into the host name, where libpq would print it in an error.
    user, _, password = userinfo.partition(":")
    user, password = unquote(user), unquote(password)
    if re.search(r":(?!\d*(,|$))", hosts.split("]")[-1]):
        raise ConfigError("DATABASE_URL is not a valid database URL (bad port)")
    parameters = parse_qsl(query, keep_blank_values=True)
    values = {key: value for key, value in parameters}
    schema = schema_override or values.get("schema") or None
    if schema is not None and not re.match(IDENTIFIER_PATTERN, schema):
        raise ConfigError("the URL's ?schema= is not a valid schema name")
    tls = _tls_parameters(values)
    replaced = {key for key, _ in tls} | PRISMA_ONLY_PARAMETERS | PRISMA_TLS_PARAMETERS
    kept = [(k, v) for k, v in parameters if k not in replaced] + tls
    credentials = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    conninfo = f"postgresql://{credentials + '@' if credentials else ''}{hosts}{path}"
    display = (
        f"postgresql://{quote(user, safe='') + (':***' if password else '') + '@' if credentials else ''}{hosts}{path}"
    )
    if kept:
        # quote, not urlencode's default quote_plus: libpq reads "+" as a plus, not a space.
        conninfo += "?" + urlencode(kept, quote_via=quote)
        display += "?" + urlencode([(k, "***" if k == "password" else v) for k, v in kept], safe="*/", quote_via=quote)
    secrets = tuple(secret for secret in {password, quote(password, safe=""), values.get("password", "")} if secret)
    database = values.get("dbname") or unquote(path.lstrip("/")) or user
    return DatabaseTarget(
        kind="postgresql",
        conninfo=conninfo,
        schema=schema,
        display=display,
        secrets=secrets,
        identity=f"postgresql:{values.get('user') or user}@{database}",
    )


def _tls_parameters(values: Mapping[str, str]) -> list[tuple[str, str]]:
    """Prisma's TLS parameters in libpq's terms, never with less verification than asked.

    Prisma: sslaccept=strict verifies the server's certificate (and host name);
    sslcert is the CA or server certificate to trust (libpq's sslrootcert);
    sslidentity/sslpassword is a PKCS#12 client identity, which libpq cannot read.
    With sslkey present, sslcert keeps libpq's meaning (a client certificate).
    """
    accept = values.get("sslaccept", "").lower()
    if accept not in ("", "strict", "accept_invalid_certs"):
        raise ConfigError(f"DATABASE_URL: sslaccept={accept!r} is not strict or accept_invalid_certs")
    if "sslidentity" in values:
        raise ConfigError(
            "DATABASE_URL: sslidentity (a PKCS#12 client identity) has no libpq equivalent; convert it "
            "(openssl pkcs12 -in ID.p12 -clcerts -nokeys -out client.crt; openssl pkcs12 -in ID.p12 "
            "-nocerts -nodes -out client.key) and give sslcert=client.crt&sslkey=client.key instead"
        )
    added: list[tuple[str, str]] = []
    trust = values.get("sslcert") if "sslkey" not in values else None
    if "sslkey" in values and "sslcert" in values:
        added.append(("sslcert", values["sslcert"]))
    if trust:
        added.append(("sslrootcert", trust))
    if accept == "strict":
        mode = values.get("sslmode", "prefer").lower()
        if mode in ("disable", "allow"):
            raise ConfigError(
                f"DATABASE_URL: sslaccept=strict asks for a verified TLS connection, but sslmode={mode} allows none"
            )
        if not trust and "sslrootcert" not in values:
            added.append(("sslrootcert", "system"))  # Prisma trusts the system's CAs
        added.append(("sslmode", "verify-full"))
    return added


# -- engines ----------------------------------------------------------------------------------


def create_engine(target: DatabaseTarget, settings: CleanupSettings, label: str) -> Engine:
    """One short-lived engine per command: no pool, bounded connect, no parameters in
    errors, and autocommit at the driver: RunConnection issues BEGIN and COMMIT itself."""
    if target.is_postgres:
        import psycopg

        def connect() -> psycopg.Connection[Any]:
            return psycopg.connect(
                target.conninfo,
                connect_timeout=settings.connect_timeout_s,
                application_name=application_name(settings, label),
                # Never server-side prepared statements: under PgBouncer's transaction
                # pooling they outlive us on the server connection and break the next
                # client ("prepared statement _pg3_0 already exists"); a short-lived
                # process gains nothing from them.
                prepare_threshold=None,
            )

        # pool_reset_on_return=None: closing must not send a ROLLBACK of its own, which
        # would end the run's transaction without its unlock (see RunConnection).
        return sa.create_engine(
            "postgresql+psycopg://",
            creator=connect,
            poolclass=NullPool,
            hide_parameters=True,
            isolation_level="AUTOCOMMIT",
            pool_reset_on_return=None,
        )
    # sqlite3's timeout is its busy timeout: how long BEGIN IMMEDIATE waits for the write lock.
    return sa.create_engine(
        target.conninfo,
        poolclass=NullPool,
        hide_parameters=True,
        isolation_level="AUTOCOMMIT",
        connect_args={"timeout": max(settings.lock_timeout_ms, 1) / 1000},
    )


def application_name(settings: CleanupSettings, label: str) -> str:
    return f"{settings.application_name}:{label}"[:63]


def lock_key(name: str) -> str:
    return f"skybot-cleanup:{name}"


# -- run transactions -------------------------------------------------------------------------


def _literal(value: str) -> str:
    """A SQL string literal for the few fixed values sent without parameters (which
    keeps them on the simple protocol: no portal, so no snapshot held while idle)."""
    return "'" + value.replace("'", "''") + "'"


class RunConnection:
    """One connection for a whole run, as a chain of transactions.

    On PostgreSQL every transaction sets application_name, lock_timeout,
    statement_timeout and idle_in_transaction_session_timeout locally. A run that
    deletes takes the task's advisory lock in its first transaction, at session level,
    so that it holds across every COMMIT AND CHAIN between batches (a transaction-level
    lock would be free for an instant at each commit). The run is in a transaction from
    its first statement to its last, so under PgBouncer's transaction pooling the server
    connection stays pinned to it, and the unlock travels in the same message as the
    final COMMIT or ROLLBACK: it can never be left behind on a pooled connection. If
    the client dies or freezes instead, the server ends the session (a lost client, or
    the idle timeout) and the lock with it; PgBouncer closes a server connection whose
    client vanished mid-transaction.

    On SQLite, BEGIN IMMEDIATE (the database write lock) plays the lock's part.
    """

    def __init__(
        self,
        conn: Connection,
        settings: CleanupSettings,
        label: str,
        *,
        lock: str | None = None,
        read_only: bool = False,
    ):
        self.conn = conn
        self.settings = settings
        self.label = label
        self.lock = lock
        self.read_only = read_only
        self.on_postgres = conn.dialect.name == "postgresql"
        self.in_transaction = False
        self.locked = False  # PostgreSQL: this session holds the task's lock

    # PostgreSQL: the statement run at the start of every transaction of the chain.
    def _prologue(self, take_lock: bool) -> str:
        settings = self.settings
        idle = settings.idle_timeout_ms
        # Never weaken a DBA's shorter idle timeout: take the smaller of the two.
        idle_sql = (
            f"(SELECT CASE WHEN setting::bigint > 0 AND setting::bigint < {idle} THEN setting "
            f"ELSE '{idle}' END FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout')"
        )
        columns = [
            f"set_config('application_name', {_literal(application_name(settings, self.label))}, true)",
            f"set_config('lock_timeout', '{settings.lock_timeout_ms}', true)",
            f"set_config('statement_timeout', '{settings.statement_timeout_ms}', true)",
            f"set_config('idle_in_transaction_session_timeout', {idle_sql}, true)",
            "pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean AS read_only",
        ]
        if take_lock:
            columns.append(f"pg_try_advisory_lock(hashtextextended({_literal(lock_key(str(self.lock)))}, 0))")
        return "SELECT " + ", ".join(columns)

    def _driver_execute(self, sql: str) -> Any:
        """Straight to psycopg, without parameters: its simple protocol, so several
        statements travel in one message and no portal (snapshot) is left open."""
        driver = self.conn.connection.driver_connection
        assert driver is not None
        return driver.execute(sql)

    def _send(self, command: str, take_lock: bool = False) -> None:
        """`command` (BEGIN, COMMIT AND CHAIN), the prologue and a savepoint in one
        message. Any error aborts the transaction; inside the savepoint it only undoes
        the batch."""
        cursor = self._driver_execute(f"{command}; {self._prologue(take_lock)}; SAVEPOINT work")
        cursor.nextset()
        row = cursor.fetchone()
        assert row is not None
        self.in_transaction = True
        if take_lock:
            self.locked = bool(row[5])  # first: whatever is raised next, the unlock must follow
        if row[4] and not self.read_only:
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
        if self.on_postgres and self.lock:
            self.locked = False
            self._driver_execute(f"{command}; SELECT pg_advisory_unlock_all()")
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

    def commit_and_continue(self) -> None:
        """Commit this transaction's work and start the next one, still holding the lock."""
        if self.on_postgres:
            self._send("COMMIT AND CHAIN")
        else:
            self.conn.exec_driver_sql("COMMIT")
            self.in_transaction = False
            self.begin()

    def undo_work(self) -> None:
        """Roll back what this transaction did since it began, keeping the lock
        (PostgreSQL only: SQLite has no row locks to run into)."""
        self.conn.exec_driver_sql("ROLLBACK TO SAVEPOINT work")

    @contextmanager
    def probe(self, lock_timeout_ms: int) -> Iterator[None]:
        """A nested savepoint with a short lock timeout: a statement that meets a held
        row fails fast, and only that statement is undone."""
        self.conn.exec_driver_sql(f"SAVEPOINT probe; SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        restore = f"RELEASE probe; SET LOCAL lock_timeout = {self.settings.lock_timeout_ms}"
        try:
            yield
        except sa.exc.OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03":
                raise
            self.conn.exec_driver_sql("ROLLBACK TO SAVEPOINT probe")
            self.conn.exec_driver_sql(restore)
            raise
        self.conn.exec_driver_sql(restore)


@contextmanager
def run_transaction(
    engine: Engine, settings: CleanupSettings, label: str, *, lock: str | None = None, read_only: bool = False
) -> Iterator[RunConnection]:
    """A RunConnection in a transaction, committed on success and rolled back otherwise."""
    with engine.connect() as conn:
        run = RunConnection(conn, settings, label, lock=lock, read_only=read_only)
        run.begin()
        try:
            yield run
        except BaseException:
            run.rollback()
            raise
        run.commit()


# -- the catalog ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableInfo:
    schema: str | None
    name: str
    columns: dict[str, str]  # name -> type as the database spells it
    estimated_rows: int | None  # the planner's reltuples; None when never analyzed (or SQLite)
    partitioned: bool = False


# One lookup per table: columns, types and the planner's row estimate. Without a
# schema the name resolves through search_path, as the unqualified DELETE will.
PG_TABLE = sa.text("""
    SELECT n.nspname, c.relname, c.reltuples::bigint, c.relkind = 'p',
           array_agg(a.attname::text ORDER BY a.attnum),
           array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE c.oid = CASE WHEN CAST(:schema AS text) IS NULL THEN to_regclass(quote_ident(CAST(:name AS text)))
                       ELSE to_regclass(format('%I.%I', CAST(:schema AS text), CAST(:name AS text))) END
    GROUP BY n.nspname, c.relname, c.reltuples, c.relkind
""")


def lookup_table(conn: Connection, schema: str | None, name: str) -> TableInfo | None:
    if conn.dialect.name == "postgresql":
        row = conn.execute(PG_TABLE, {"schema": schema, "name": name}).one_or_none()
        if row is None:
            return None
        namespace, relname, reltuples, partitioned, names, types = row
        return TableInfo(
            schema=namespace,
            name=relname,
            columns=dict(zip(names, types, strict=True)),
            estimated_rows=reltuples if reltuples >= 0 else None,
            partitioned=bool(partitioned),
        )
    rows = conn.exec_driver_sql(f"PRAGMA table_info({_literal(name)})").all()
    if not rows:
        return None
    return TableInfo(schema=None, name=name, columns={row[1]: str(row[2]).lower() for row in rows}, estimated_rows=None)


def schema_exists(conn: Connection, name: str) -> bool:
    return conn.scalar(sa.text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": name}) is not None


def qualified(schema: str | None, name: str) -> str:
    return f'"{schema}"."{name}"' if schema else f'"{name}"'


@dataclass(frozen=True)
class BoundTable:
    """One of the app's tables as SQLAlchemy Core objects, checked against the database."""

    spec: TableSpec
    table: sa.Table
    columns: dict[str, ColumnElement[Any]]  # role -> column
    info: TableInfo

    @property
    def shown(self) -> str:
        return qualified(self.table.schema, self.table.name)


def bind_table(conn: Connection, settings: CleanupSettings, schema: str | None, spec: TableSpec) -> BoundTable:
    """The configured table, after checking that it and its columns exist.

    Names are always quoted identifiers (never pasted into SQL), and a missing
    table or column is a configuration error naming the setting to fix.
    """
    name = settings.table_name(spec)
    info = lookup_table(conn, schema, name)
    if info is None:
        raise ConfigError(f"table {qualified(schema, name)} not found (setting {env_name(table_field(spec))})")
    columns = []
    for role, column in spec.roles.items():
        column_name = settings.column_name(spec, role)
        if column_name not in info.columns:
            raise ConfigError(
                f'column "{column_name}" not found in table {qualified(schema, name)} '
                f"(setting {env_name(column_field(spec, role))})"
            )
        columns.append((role, sa.Column(quoted_name(column_name, quote=True), SQL_TYPES[column.type].bind)))
    table = sa.Table(
        quoted_name(name, quote=True),
        sa.MetaData(),
        *(column for _, column in columns),
        schema=quoted_name(schema, quote=True) if schema else None,
    )
    return BoundTable(
        spec=spec, table=table, columns={role: table.c[column.name] for role, column in columns}, info=info
    )


# -- batch statements -------------------------------------------------------------------------


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


def count_capped(conn: Connection, table: BoundTable, where: ColumnElement[bool], cap: int) -> int:
    """How many rows match, counting no further than `cap` (an exact count could scan a
    whole backlog, and a progress figure does not need it)."""
    inner = sa.select(sa.literal(1)).select_from(table.table).where(where).limit(cap).subquery()
    return int(conn.scalar(sa.select(sa.func.count()).select_from(inner)) or 0)


def estimate_rows(conn: Connection, table: BoundTable, where: ColumnElement[bool]) -> int:
    """The planner's estimate of the rows matching `where` (PostgreSQL): no scan at all."""
    compiled = sa.select(sa.literal(1)).select_from(table.table).where(where).compile(conn)
    plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar()
    return int(plan[0]["Plan"]["Plan Rows"]) if plan else 0
