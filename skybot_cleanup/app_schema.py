"""The app's tables as its Prisma migrations create them, built from the registry:
the test, demo and benchmark schema. Constraint and index names are Prisma's.

The tool itself never creates these: it only binds the columns it needs (db.bind_table).
"""

from __future__ import annotations

import sqlalchemy as sa

from skybot_cleanup.db.catalog import SQL_TYPES
from skybot_cleanup.registry import PARENT_TABLES, REGISTRY, Column, Registry, TableSpec
from skybot_cleanup.settings import Settings

_DEFAULTS: dict[str, sa.TextClause] = {
    "CURRENT_TIMESTAMP": sa.text("CURRENT_TIMESTAMP"),
    "false": sa.text("false"),
    "true": sa.text("true"),
}


def app_metadata(
    settings: Settings | None = None, schema: str | None = None, registry: Registry = REGISTRY
) -> sa.MetaData:
    """Every table of the registry, named as the settings say (defaults: Prisma's names),
    with the parent tables their foreign keys need."""
    metadata = sa.MetaData(schema=schema)
    prefix = f"{schema}." if schema else ""
    for parent, keys in PARENT_TABLES.items():
        sa.Table(
            parent,
            metadata,
            sa.Column("id", sa.Text, primary_key=True),
            *(sa.Column(key.column, sa.Text, nullable=False) for key in keys),
            *(_foreign_key(parent, key.column, f"{prefix}{key.references}") for key in keys),
            sa.PrimaryKeyConstraint("id", name=f"{parent}_pkey"),
        )
    for spec in registry.tables:
        _table(metadata, spec, settings, prefix)
    return metadata


def _table(metadata: sa.MetaData, spec: TableSpec, settings: Settings | None, prefix: str) -> sa.Table:
    name = settings.table_name(spec) if settings else spec.name

    def column_name(column: Column) -> str:
        return settings.column_name(spec, column.role) if settings and column.role else column.name

    names = {column.name: column_name(column) for column in spec.columns}
    columns = [
        sa.Column(
            names[column.name],
            SQL_TYPES[column.type].ddl,
            nullable=column.nullable,
            server_default=_DEFAULTS[column.default] if column.default else None,
        )
        for column in spec.columns
    ]
    return sa.Table(
        name,
        metadata,
        *columns,
        sa.PrimaryKeyConstraint(names["id"], name=f"{name}_pkey"),
        *(sa.Index(f"{name}_{column}_key", names[column], unique=True) for column in spec.unique),
        *(sa.Index(f"{name}_{column}_idx", names[column]) for column in spec.indexes),
        *(_foreign_key(name, names[key.column], f"{prefix}{key.references}") for key in spec.foreign_keys),
    )


def _foreign_key(table: str, column: str, parent: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{parent}.id"], name=f"{table}_{column}_fkey", ondelete="CASCADE", onupdate="CASCADE"
    )
