"""The catalog: the app's tables as the database has them, bound as SQLAlchemy Core objects.

Names are always quoted identifiers (never pasted into SQL), and a missing table or
column is a configuration error naming the setting that renames it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
class TableInfo:
    schema: str | None
    name: str
    columns: dict[str, str]  # name -> type as the database spells it
    estimated_rows: int | None  # the planner's reltuples; None when never analyzed (or SQLite)
    partitioned: bool = False
    pages: int | None = None  # the planner's relpages (0 when never analyzed or vacuumed)
    # Row-level security applies to this role: every statement sees only what its policies allow.
    rls_hides_rows: bool = False
    rls_forced: bool = False

    @property
    def rls_warning(self) -> str | None:
        if not self.rls_hides_rows:
            return None
        return (
            f"row-level security is on for {qualified(self.schema, self.name)} and this role is neither its "
            "owner, nor BYPASSRLS, nor a superuser: it sees, counts and deletes only the rows its policies "
            "allow (`skybot-cleanup check` says what to grant)"
        )


# One lookup per table: columns, types, the planner's row estimate, and whether
# row-level security hides rows from this role (RLS is on, and the role is not a
# superuser, not BYPASSRLS, and not the owner, or the owner of a table that forces it).
PG_TABLE = sa.text("""
    SELECT n.nspname, c.relname, c.reltuples::bigint, c.relkind = 'p', c.relpages,
           pg_catalog.array_agg(a.attname::text ORDER BY a.attnum),
           pg_catalog.array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum),
           c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls)
               AND (c.relforcerowsecurity OR NOT pg_catalog.pg_has_role(c.relowner, 'USAGE')),
           c.relforcerowsecurity
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    JOIN pg_catalog.pg_roles r ON r.rolname = CURRENT_USER
    WHERE c.oid = pg_catalog.to_regclass(pg_catalog.quote_ident(CAST(:schema AS text)) || '.'
                                         || pg_catalog.quote_ident(CAST(:name AS text)))
    GROUP BY n.nspname, c.relname, c.reltuples, c.relkind, c.relpages, c.relrowsecurity, c.relforcerowsecurity,
             c.relowner, r.rolsuper, r.rolbypassrls
""")


def lookup_table(conn: Connection, schema: str | None, name: str) -> TableInfo | None:
    if conn.dialect.name == "postgresql":
        row = conn.execute(PG_TABLE, {"schema": schema, "name": name}).one_or_none()
        if row is None:
            return None
        namespace, relname, reltuples, partitioned, pages, names, types, rls_hides_rows, rls_forced = row
        return TableInfo(
            schema=namespace,
            name=relname,
            columns=dict(zip(names, types, strict=True)),
            estimated_rows=reltuples if reltuples >= 0 else None,
            partitioned=bool(partitioned),
            pages=pages,
            rls_hides_rows=bool(rls_hides_rows),
            rls_forced=bool(rls_forced),
        )
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
    """The configured table, after checking that it and its columns exist."""
    info = lookup_table(conn, schema, names.table)
    if info is None:
        raise ConfigError(f"table {qualified(schema, names.table)} not found (setting {names.table_variable})")
    columns = []
    for role, column in spec.roles.items():
        column_name = names.columns[role]
        if column_name not in info.columns:
            raise ConfigError(
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


def bind_all(
    conn: Connection, schema: str | None, registry: Registry, names: dict[str, TableNames]
) -> dict[str, BoundTable | ConfigError]:
    """Every table of the registry (names by table key), or the error that says which setting to fix."""
    bound: dict[str, BoundTable | ConfigError] = {}
    for spec in registry.tables:
        try:
            bound[spec.key] = bind_table(conn, schema, spec, names[spec.key])
        except ConfigError as exc:
            bound[spec.key] = exc
    return bound


# Summed over the leaves of pg_partition_tree (a plain table is its own only leaf): a
# partitioned table has no storage or statistics of its own.
PG_TABLE_HEALTH = sa.text("""
    WITH root AS (
        SELECT pg_catalog.to_regclass(pg_catalog.quote_ident(CAST(:schema AS text)) || '.'
                                      || pg_catalog.quote_ident(CAST(:name AS text))) AS oid
    ),
    leaves AS (
        SELECT t.relid FROM root, pg_catalog.pg_partition_tree(root.oid) t WHERE t.isleaf
        UNION
        SELECT root.oid FROM root JOIN pg_catalog.pg_class c ON c.oid = root.oid WHERE c.relkind <> 'p'
    )
    SELECT pg_catalog.sum(pg_catalog.pg_total_relation_size(l.relid))::bigint AS size_bytes,
           pg_catalog.sum(s.n_dead_tup)::bigint AS dead_tuples,
           pg_catalog.max(greatest(s.last_vacuum, s.last_autovacuum)) AS last_vacuum,
           pg_catalog.max(greatest(s.last_analyze, s.last_autoanalyze)) AS last_analyze,
           CASE WHEN pg_catalog.bool_and(c.reltuples >= 0) THEN pg_catalog.sum(c.reltuples)::bigint END
               AS estimated_rows,
           pg_catalog.count(*) AS partitions
    FROM leaves l
    JOIN pg_catalog.pg_class c ON c.oid = l.relid
    LEFT JOIN pg_catalog.pg_stat_user_tables s ON s.relid = l.relid
""")


def table_health(conn: Connection, info: TableInfo) -> dict[str, Any]:
    """Size, dead tuples, last vacuum and analyze, and the planner's row estimate (PostgreSQL)."""
    return dict(conn.execute(PG_TABLE_HEALTH, {"schema": info.schema, "name": info.name}).mappings().one())
