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
    rows = conn.exec_driver_sql(f"PRAGMA table_info({sql_literal(name)})").all()
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
    WITH root AS (SELECT to_regclass(format('%I.%I', CAST(:schema AS text), CAST(:name AS text))) AS oid),
    leaves AS (
        SELECT t.relid FROM root, pg_partition_tree(root.oid) t WHERE t.isleaf
        UNION
        SELECT root.oid FROM root JOIN pg_class c ON c.oid = root.oid WHERE c.relkind <> 'p'
    )
    SELECT sum(pg_total_relation_size(l.relid))::bigint AS size_bytes, sum(s.n_dead_tup)::bigint AS dead_tuples,
           max(greatest(s.last_vacuum, s.last_autovacuum)) AS last_vacuum,
           max(greatest(s.last_analyze, s.last_autoanalyze)) AS last_analyze,
           CASE WHEN bool_and(c.reltuples >= 0) THEN sum(c.reltuples)::bigint END AS estimated_rows,
           count(*) AS partitions
    FROM leaves l
    JOIN pg_class c ON c.oid = l.relid
    LEFT JOIN pg_stat_user_tables s ON s.relid = l.relid
""")


def table_health(conn: Connection, info: TableInfo) -> dict[str, Any]:
    """Size, dead tuples, last vacuum and analyze, and the planner's row estimate (PostgreSQL)."""
    return dict(conn.execute(PG_TABLE_HEALTH, {"schema": info.schema, "name": info.name}).mappings().one())
