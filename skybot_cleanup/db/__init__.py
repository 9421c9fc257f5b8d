"""Everything that talks SQL, in four parts, so `from skybot_cleanup import db` reads well:

- urls: DATABASE_URL as Render, Prisma or libpq write it, made into what psycopg takes;
- connection: engines, and a run's chain of transactions with its session settings and lock;
- catalog: the app's tables as the database has them, bound as SQLAlchemy Core objects;
- batches and counts: the statements that delete a slice of due rows, and cheap counts.

This layer reads no settings and knows no command: it is given what it needs.
"""

from skybot_cleanup.db.batches import (
    HEAP_WALK_PLANNER,
    BatchOutcome,
    ctid,
    delete_all,
    delete_rowids,
    guard,
    heap_batch,
    held_tuple,
    index_batch,
    page_of,
    run_batch,
    tid,
    tid_of,
    tid_text,
)
from skybot_cleanup.db.catalog import (
    SQL_TYPES,
    BoundTable,
    TableInfo,
    TableNames,
    TableShape,
    bind,
    bind_all,
    bind_table,
    lookup_table,
    lookup_tables,
    qualified,
    schema_exists,
)
from skybot_cleanup.db.connection import (
    RunConnection,
    SessionSettings,
    Standby,
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
    Count,
    CountReading,
    capped,
    count_capped,
    estimate_rows,
    min_of,
    read_counts,
)
from skybot_cleanup.db.reads import Pending, Reads
from skybot_cleanup.db.urls import DatabaseTarget, parse_database_url

__all__ = [
    "COUNT_CAP",
    "HEAP_WALK_PLANNER",
    "INDEX_WALK_PLANNER",
    "SQL_TYPES",
    "BatchOutcome",
    "BoundTable",
    "Count",
    "CountReading",
    "DatabaseTarget",
    "Pending",
    "Reads",
    "RunConnection",
    "SessionSettings",
    "Standby",
    "TableInfo",
    "TableNames",
    "TableShape",
    "application_name",
    "bind",
    "bind_all",
    "bind_table",
    "capped",
    "count_capped",
    "create_engine",
    "ctid",
    "delete_all",
    "delete_rowids",
    "estimate_rows",
    "guard",
    "heap_batch",
    "held_tuple",
    "index_batch",
    "lock_key",
    "lookup_table",
    "lookup_tables",
    "min_of",
    "page_of",
    "parse_database_url",
    "qualified",
    "read_counts",
    "run_batch",
    "run_transaction",
    "savepoint",
    "schema_exists",
    "sql_literal",
    "tid",
    "tid_of",
    "tid_text",
]
