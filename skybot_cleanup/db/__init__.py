"""Everything that talks SQL, in four parts, so `from skybot_cleanup import db` reads well:

- urls: DATABASE_URL as Render, Prisma or libpq write it, made into what psycopg takes;
- connection: engines, and a run's chain of transactions with its session settings and lock;
- catalog: the app's tables as the database has them, bound as SQLAlchemy Core objects;
- batches and counts: the statements that delete a slice of due rows, and cheap counts.

This layer reads no settings and knows no command: it is given what it needs.
"""

from skybot_cleanup.db.batches import (
    HEAP_WALK_PLANNER,
    ctid,
    delete_all,
    delete_ctids,
    delete_pages,
    delete_rowids,
    guard,
    heap_pages,
    held_tuple,
    page_of,
    page_range_delete,
    pick,
    tid,
)
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
from skybot_cleanup.db.counts import (
    COUNT_CAP,
    INDEX_WALK_PLANNER,
    Backlog,
    Count,
    count,
    count_capped,
    estimate_rows,
    task_backlog,
)
from skybot_cleanup.db.urls import DatabaseTarget, parse_database_url

__all__ = [
    "COUNT_CAP",
    "HEAP_WALK_PLANNER",
    "INDEX_WALK_PLANNER",
    "SQL_TYPES",
    "Backlog",
    "BoundTable",
    "Count",
    "DatabaseTarget",
    "RunConnection",
    "SessionSettings",
    "TableInfo",
    "TableNames",
    "application_name",
    "bind_all",
    "bind_table",
    "count",
    "count_capped",
    "create_engine",
    "ctid",
    "delete_all",
    "delete_ctids",
    "delete_pages",
    "delete_rowids",
    "estimate_rows",
    "guard",
    "heap_pages",
    "held_tuple",
    "lock_key",
    "lookup_table",
    "page_of",
    "page_range_delete",
    "parse_database_url",
    "pick",
    "qualified",
    "run_transaction",
    "savepoint",
    "schema_exists",
    "sql_literal",
    "table_health",
    "task_backlog",
    "tid",
]
