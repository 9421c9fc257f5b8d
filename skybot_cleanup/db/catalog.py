"""The catalog: the app's tables as the database has them, bound as SQLAlchemy Core objects.

Names are always quoted identifiers (never pasted into SQL), and a missing table or
column is a configuration error naming the setting that renames it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement, quoted_name

from skybot_cleanup.db.connection import sql_literal
from skybot_cleanup.errors import ConfigError
from skybot_cleanup.registry import ColumnType, Registry, TableSpec


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


@dataclass(frozen=True)
class TableNames:
    """A table's name and the names of the columns the tool reads, as configured, with the
    variables that set them (for messages)."""

    table: str
    columns: dict[str, str]  # role -> column name
    table_variable: str
    column_variables: dict[str, str]  # role -> variable


@dataclass(frozen=True)
class Code:
    """A trigger or rule that runs when the tool writes to a table, as the tool's role."""

    kind: str  # trigger | rule
    name: str
    table: str  # the table (or leaf) it is on
    what: str  # the trigger's function; the rule's event
    owner: str  # whose code it is: the function's owner; the rule's table's owner
    safe: bool  # its owner has every privilege this role has (or it runs as its owner)
    events: int = 0  # a trigger's tgtype bits (4 INSERT, 8 DELETE, 16 UPDATE, 32 TRUNCATE)

    # A rule's ev_type, as the events it answers.
    RULE_EVENTS: ClassVar[dict[str, int]] = {"2": 16, "3": 4, "4": 8}

    def fires_on(self, events: int) -> bool:
        mask = self.events if self.kind == "trigger" else self.RULE_EVENTS.get(self.what, 0)
        return bool(mask & events)

    def __str__(self) -> str:
        if self.kind == "trigger":
            return f'trigger "{self.name}" on "{self.table}" (function {self.what}, owned by {self.owner})'
        return f'rule "{self.name}" on "{self.table}" (owned by {self.owner})'


INSERT, DELETE = 4, 8  # trigger event bits (pg_trigger.tgtype)


class TableShape(StrEnum):
    """How a table stores its rows: what a walk by ctid must cover."""

    PLAIN = "plain"
    PARTITIONED = "partitioned"  # declarative partitions: the rows live in the leaves
    INHERITED = "inherited"  # old-style INHERITS children, each with its own rows, beside the parent's


@dataclass(frozen=True)
class TableInfo:
    schema: str | None
    name: str
    columns: dict[str, str]  # name -> type as the database spells it
    # The planner's row count over every leaf; None when a leaf was never analyzed (or SQLite).
    estimated_rows: int | None
    shape: TableShape = TableShape.PLAIN
    leaves: int = 1  # tables that hold rows: the table itself, or its partitions, or it and its children
    # The largest leaf's size in pages, read from its file (not the statistics): a TID range
    # applies to every leaf, so a walk of the heap covers this many pages.
    pages: int = 0
    # Rows per page over the analyzed leaves (None: none analyzed yet). A partitioned
    # parent's own figures are never used: ANALYZE sets its relpages to -1.
    rows_per_page: float | None = None
    # Row-level security applies to this role: every statement sees only what its policies allow.
    rls_hides_rows: bool = False
    rls_forced: bool = False
    size_bytes: int | None = None  # every leaf, with indexes and TOAST
    dead_tuples: int | None = None
    last_vacuum: datetime | None = None
    last_analyze: datetime | None = None
    # The connecting role's privileges on the table (a run needs both; reports, SELECT).
    can_select: bool = True
    can_delete: bool = True
    role: str = ""  # the connecting role, as the privileges above are its own
    owner: str = ""
    owned: bool = False  # the role has its owner's privileges (is, or is a member of, the owner)
    schema_owner: str = ""
    schema_owned: bool = False
    extra_privileges: tuple[str, ...] = ()  # on the table, beyond SELECT and DELETE
    code: tuple[Code, ...] = ()  # triggers and rules that run as the role when it writes to the table
    # The role itself: what it holds beyond any cleanup's needs.
    superuser: bool = False
    createrole: bool = False
    server_roles: tuple[str, ...] = ()  # pg_execute_server_program, pg_write_server_files...

    def unsafe_code(self, events: int, trusted: Collection[str] = ()) -> list[Code]:
        """Triggers and rules that would run someone else's code with this role's extra
        privileges when it writes (`events`), but those named in `trusted`."""
        return [code for code in self.code if code.fires_on(events) and not code.safe and code.name not in trusted]

    @property
    def multi_leaf(self) -> bool:
        """A ctid names a row in each leaf: statements by ctid must say which leaf too."""
        return self.leaves > 1 or self.shape is TableShape.PARTITIONED

    @property
    def rls_warning(self) -> str | None:
        if not self.rls_hides_rows:
            return None
        return (
            f"row-level security is on for {qualified(self.schema, self.name)} and this role is neither its "
            "owner, nor BYPASSRLS, nor a superuser: it sees, counts and deletes only the rows its policies "
            "allow (`skybot-cleanup check` says what to grant)"
        )


# One lookup for any number of tables, in one round trip: columns and types, the shape
# (partitions and inheritance children, walked through pg_inherits), each leaf's size and
# statistics, and whether row-level security hides rows from this role: RLS is on, and the
# role is not a superuser, not BYPASSRLS, and not the owner (or the owner of a table that
# forces it), and no policy lets it see and delete every row (a permissive USING (true)
# for SELECT and for DELETE, and no restrictive policy).
PG_TABLES = sa.text("""
    SELECT wanted.ord, n.nspname, c.relname, c.relkind::text,
           (SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum) FROM pg_catalog.pg_attribute a
            WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS names,
           (SELECT pg_catalog.array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
            FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS types,
           leaf.leaves, leaf.foreign_leaves, leaf.pages, leaf.analyzed, leaf.stat_rows, leaf.stat_pages,
           leaf.size_bytes, leaf.dead_tuples, leaf.last_vacuum, leaf.last_analyze,
           c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls)
               AND (c.relforcerowsecurity OR NOT pg_catalog.pg_has_role(c.relowner, 'USAGE'))
               AND NOT (
                   NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policy p
                               WHERE p.polrelid = c.oid AND NOT p.polpermissive
                                 AND (0::oid = ANY (p.polroles) OR EXISTS (
                                      SELECT 1 FROM pg_catalog.unnest(p.polroles) pr(oid)
                                      WHERE pg_catalog.pg_has_role(pr.oid, 'USAGE'))))
                   AND (SELECT pg_catalog.count(DISTINCT p.polcmd) = 2
                               OR coalesce(pg_catalog.bool_or(p.polcmd = '*'), false)
                        FROM pg_catalog.pg_policy p
                        WHERE p.polrelid = c.oid AND p.polpermissive AND p.polcmd IN ('*', 'r', 'd')
                          AND pg_catalog.pg_get_expr(p.polqual, p.polrelid) = 'true'
                          AND (0::oid = ANY (p.polroles) OR EXISTS (
                               SELECT 1 FROM pg_catalog.unnest(p.polroles) pr(oid)
                               WHERE pg_catalog.pg_has_role(pr.oid, 'USAGE'))))
               ) AS rls_hides_rows,
           c.relforcerowsecurity,
           pg_catalog.has_table_privilege(c.oid, 'SELECT') AS can_select,
           pg_catalog.has_table_privilege(c.oid, 'DELETE') AS can_delete,
           CURRENT_USER::text AS role,
           owner.rolname AS owner, pg_catalog.pg_has_role(c.relowner, 'USAGE') AS owned,
           schema_owner.rolname AS schema_owner, pg_catalog.pg_has_role(n.nspowner, 'USAGE') AS schema_owned,
           ARRAY(SELECT privilege FROM pg_catalog.unnest(ARRAY['INSERT', 'UPDATE', 'TRUNCATE', 'REFERENCES',
                                                               'TRIGGER']) AS privilege
                 WHERE pg_catalog.has_table_privilege(c.oid, privilege)) AS extra_privileges,
           code.code,
           -- What the role holds beyond a cleanup's needs, whatever the table.
           r.rolsuper, r.rolcreaterole,
           ARRAY(SELECT name FROM pg_catalog.unnest(ARRAY['pg_execute_server_program', 'pg_write_server_files',
                                                          'pg_read_server_files']) AS name
                 WHERE pg_catalog.pg_has_role(name, 'USAGE')) AS server_roles
    FROM ROWS FROM (pg_catalog.unnest(CAST(:schemas AS text[])), pg_catalog.unnest(CAST(:names AS text[])))
         WITH ORDINALITY AS wanted(schema_name, table_name, ord)
    -- By name in the catalog, not to_regclass(): a schema the role may not use is one whose
    -- tables it cannot see (to_regclass would fail the whole lookup for it).
    JOIN pg_catalog.pg_namespace n
      ON n.nspname = wanted.schema_name AND pg_catalog.has_schema_privilege(n.oid, 'USAGE')
    JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = wanted.table_name
    JOIN pg_catalog.pg_roles r ON r.rolname = CURRENT_USER
    JOIN pg_catalog.pg_roles owner ON owner.oid = c.relowner
    JOIN pg_catalog.pg_roles schema_owner ON schema_owner.oid = n.nspowner
    -- Code that runs when the tool writes to the table, as the tool's role: each enabled
    -- trigger on it or its leaves (with its function's owner), each rule (its table's
    -- owner's), and whether running it as this role is safe: the code is this role's, or
    -- runs as its owner (SECURITY DEFINER), or its owner already has this role's
    -- privileges (both superusers; or, for a role that is not, a member of it).
    CROSS JOIN LATERAL (
        WITH RECURSIVE tree(relid) AS (
            SELECT c.oid
            UNION ALL
            SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid
        )
        SELECT pg_catalog.json_agg(entry) AS code FROM (
            SELECT pg_catalog.json_build_array(
                       'trigger', t.tgname, tr.relname, p.oid::pg_catalog.regprocedure::text, fo.rolname,
                       p.prosecdef OR p.proowner = r.oid OR (r.rolsuper AND fo.rolsuper)
                           OR (NOT r.rolsuper AND pg_catalog.pg_has_role(p.proowner, r.oid, 'USAGE')),
                       t.tgtype::integer) AS entry
            FROM tree
            JOIN pg_catalog.pg_trigger t ON t.tgrelid = tree.relid AND NOT t.tgisinternal AND t.tgenabled IN ('O', 'A')
            JOIN pg_catalog.pg_class tr ON tr.oid = t.tgrelid
            JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
            JOIN pg_catalog.pg_roles fo ON fo.oid = p.proowner
            UNION ALL
            SELECT pg_catalog.json_build_array(
                       'rule', w.rulename, wr.relname, w.ev_type::text, wo.rolname,
                       wr.relowner = r.oid OR (r.rolsuper AND wo.rolsuper)
                           OR (NOT r.rolsuper AND pg_catalog.pg_has_role(wr.relowner, r.oid, 'USAGE')),
                       0)
            FROM tree
            JOIN pg_catalog.pg_rewrite w ON w.ev_class = tree.relid AND w.rulename <> '_RETURN' AND w.ev_enabled <> 'D'
            JOIN pg_catalog.pg_class wr ON wr.oid = w.ev_class
            JOIN pg_catalog.pg_roles wo ON wo.oid = wr.relowner
        ) entries
    ) code
    CROSS JOIN LATERAL (
        WITH RECURSIVE tree(relid) AS (
            SELECT c.oid
            UNION ALL
            SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid
        )
        SELECT pg_catalog.count(*) AS leaves,
               pg_catalog.count(*) FILTER (WHERE l.relkind = 'f') AS foreign_leaves,
               pg_catalog.max(pg_catalog.pg_relation_size(l.oid)) FILTER (WHERE l.relkind <> 'f')
                   / pg_catalog.current_setting('block_size')::bigint AS pages,
               pg_catalog.bool_and(l.reltuples >= 0) AS analyzed,
               pg_catalog.sum(l.reltuples) FILTER (WHERE l.reltuples >= 0 AND l.relpages > 0) AS stat_rows,
               pg_catalog.sum(l.relpages) FILTER (WHERE l.reltuples >= 0 AND l.relpages > 0) AS stat_pages,
               pg_catalog.sum(pg_catalog.pg_total_relation_size(l.oid))::bigint AS size_bytes,
               pg_catalog.sum(s.n_dead_tup)::bigint AS dead_tuples,
               pg_catalog.max(greatest(s.last_vacuum, s.last_autovacuum)) AS last_vacuum,
               pg_catalog.max(greatest(s.last_analyze, s.last_autoanalyze)) AS last_analyze
        FROM tree
        JOIN pg_catalog.pg_class l ON l.oid = tree.relid AND l.relkind NOT IN ('p', 'v', 'm')
        LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = l.oid
    ) leaf
""")

_NOT_TABLES = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "c": "a composite type"}


Found = TableInfo | ConfigError | None


def lookup_tables(conn: Connection, wanted: Sequence[tuple[str | None, str]]) -> list[Found]:
    """Each (schema, name) as the database has it; None where there is no such relation,
    and a ConfigError for one that is no table (a view: the tool deletes by ctid, which
    only tables have). One round trip for all of them."""
    if conn.dialect.name != "postgresql":
        return [_sqlite_table(conn, name) for _schema, name in wanted]
    rows = conn.execute(
        PG_TABLES, {"schemas": [schema for schema, _ in wanted], "names": [name for _, name in wanted]}
    ).all()
    found: list[Found] = [None] * len(wanted)
    for row in rows:
        found[row.ord - 1] = _table_info(row)
    return found


def lookup_table(conn: Connection, schema: str | None, name: str) -> TableInfo | None:
    """One table, or None; raises ConfigError for a relation that is no table."""
    found = lookup_tables(conn, [(schema, name)])[0]
    if isinstance(found, ConfigError):
        raise found
    return found


def _table_info(row: Any) -> TableInfo | ConfigError:
    shown = qualified(row.nspname, row.relname)
    if row.relkind in _NOT_TABLES:
        return ConfigError(
            f"{shown} is {_NOT_TABLES[row.relkind]}, not a table: the tool deletes rows by their physical "
            "address, which only tables have; point the setting at the table itself"
        )
    if row.foreign_leaves:
        return ConfigError(
            f"{shown} has {row.foreign_leaves} foreign partition(s): the tool deletes rows by their physical "
            "address, which a foreign table does not have; clean those on their own server"
        )
    if row.relkind == "p":
        shape = TableShape.PARTITIONED
    else:
        shape = TableShape.INHERITED if row.leaves > 1 else TableShape.PLAIN
    return TableInfo(
        schema=row.nspname,
        name=row.relname,
        columns=dict(zip(row.names, row.types, strict=True)),
        estimated_rows=int(row.stat_rows or 0) if row.analyzed else None,
        shape=shape,
        leaves=int(row.leaves),
        pages=int(row.pages or 0),
        rows_per_page=float(row.stat_rows) / float(row.stat_pages) if row.stat_pages else None,
        rls_hides_rows=bool(row.rls_hides_rows),
        rls_forced=bool(row.relforcerowsecurity),
        size_bytes=row.size_bytes,
        dead_tuples=row.dead_tuples,
        last_vacuum=row.last_vacuum,
        last_analyze=row.last_analyze,
        can_select=bool(row.can_select),
        can_delete=bool(row.can_delete),
        role=row.role,
        owner=row.owner,
        owned=bool(row.owned),
        schema_owner=row.schema_owner,
        schema_owned=bool(row.schema_owned),
        extra_privileges=tuple(row.extra_privileges or ()),
        code=tuple(Code(*entry) for entry in row.code or ()),
        superuser=bool(row.rolsuper),
        createrole=bool(row.rolcreaterole),
        server_roles=tuple(row.server_roles or ()),
    )


def _sqlite_table(conn: Connection, name: str) -> TableInfo | None:
    rows = conn.exec_driver_sql(f"PRAGMA table_info({sql_literal(name)})").all()
    if not rows:
        return None
    return TableInfo(schema=None, name=name, columns={row[1]: str(row[2]).lower() for row in rows}, estimated_rows=None)


def schema_exists(conn: Connection, name: str) -> bool:
    return (
        conn.scalar(sa.text("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = :name"), {"name": name}) is not None
    )


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


def bind_table(conn: Connection, schema: str | None, spec: TableSpec, names: TableNames) -> BoundTable:
    """The configured table, after checking that it and its columns exist; raises ConfigError."""
    bound = bind(schema, spec, names, lookup_tables(conn, [(schema, names.table)])[0])
    if isinstance(bound, ConfigError):
        raise bound
    return bound


def bind_all(
    conn: Connection, schema: str | None, registry: Registry, names: dict[str, TableNames]
) -> dict[str, BoundTable | ConfigError]:
    """Every table of the registry (names by table key), or the error that says which
    setting to fix; one round trip."""
    found = lookup_tables(conn, [(schema, names[spec.key].table) for spec in registry.tables])
    return {
        spec.key: bind(schema, spec, names[spec.key], info) for spec, info in zip(registry.tables, found, strict=True)
    }


def bind(schema: str | None, spec: TableSpec, names: TableNames, info: Found) -> BoundTable | ConfigError:
    """A table as lookup_tables found it, bound; or the error that says which setting to fix."""
    if isinstance(info, ConfigError):
        return ConfigError(f"{info} (setting {names.table_variable})")
    if info is None:
        return ConfigError(f"table {qualified(schema, names.table)} not found (setting {names.table_variable})")
    columns = []
    for role, column in spec.roles.items():
        column_name = names.columns[role]
        if column_name not in info.columns:
            return ConfigError(
                f'column "{column_name}" not found in table {qualified(schema, names.table)} '
                f"(setting {names.column_variables[role]})"
            )
        columns.append((role, sa.Column(quoted_name(column_name, quote=True), SQL_TYPES[column.type].bind)))
    table = sa.Table(
        quoted_name(names.table, quote=True),
        sa.MetaData(),
        *(column for _, column in columns),
        schema=quoted_name(schema, quote=True) if schema else None,
    )
    return BoundTable(
        spec=spec, table=table, columns={role: table.c[column.name] for role, column in columns}, info=info
    )
