"""Everything that talks SQL, in four parts, so `from skybot_cleanup import db` reads well:

- urls: DATABASE_URL as Render, Prisma or libpq write it, made into what psycopg takes;
- connection: engines, and a run's chain of transactions with its session settings and lock;
- catalog: the app's tables as the database has them, bound as SQLAlchemy Core objects;
- batches and counts: the statements that delete a slice of due rows, and cheap counts.

This layer reads no settings and knows no command: it is given what it needs.
"""

from skybot_cleanup.db.batches import LowWater, batch_end, delete_ids, delete_range, delete_ties, ids_where
from skybot_cleanup.db.catalog import (
    SQL_TYPES,
    BoundTable,
    TableInfo,
    TableNames,
    bind_all,
    bind_table,
    lookup_table,
    qualified,
    schema_exists,
    table_health,
)
from skybot_cleanup.db.connection import (
    RunConnection,
    SessionSettings,
    application_name,
    create_engine,
    lock_key,
    run_transaction,
    savepoint,
    sql_literal,
)
from skybot_cleanup.db.counts import COUNT_CAP, Backlog, Count, count, count_capped, estimate_rows, task_backlog
from skybot_cleanup.db.urls import DatabaseTarget, parse_database_url

__all__ = [
    "COUNT_CAP",
    "SQL_TYPES",
    "Backlog",
    "BoundTable",
    "Count",
    "DatabaseTarget",
    "LowWater",
    "RunConnection",
    "SessionSettings",
    "TableInfo",
    "TableNames",
    "application_name",
    "batch_end",
    "bind_all",
    "bind_table",
    "count",
    "count_capped",
    "create_engine",
    "delete_ids",
    "delete_range",
    "delete_ties",
    "estimate_rows",
    "ids_where",
    "lock_key",
    "lookup_table",
    "parse_database_url",
    "qualified",
    "run_transaction",
    "savepoint",
    "schema_exists",
    "sql_literal",
    "table_health",
    "task_backlog",
]
