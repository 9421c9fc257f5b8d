"""`skybot-cleanup check`: a pre-flight to run before the first install and after
every app migration. Each finding is one line a person can act on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from skybot_cleanup import db
from skybot_cleanup.errors import ConfigError
from skybot_cleanup.history import history_tables
from skybot_cleanup.settings import env_name
from skybot_cleanup.tasks import TABLES, TASKS

# What each registry column type must be in the database, and why.
_EXPECTED_TYPES = {
    "timestamp": "timestamp without time zone",
    "text": "text",
    "integer": "integer",
    "boolean": "boolean",
}

PG_COLUMN_TYPES = sa.text("""
    SELECT a.attname, format_type(a.atttypid, NULL) AS type
    FROM pg_attribute a
    WHERE a.attrelid = to_regclass(format('%I.%I', coalesce(CAST(:schema AS text), current_schema()), CAST(:name AS text)))
      AND a.attnum > 0 AND NOT a.attisdropped
""")
PG_PRIVILEGES = sa.text("""
    SELECT has_table_privilege(format('%I.%I', coalesce(CAST(:schema AS text), current_schema()), CAST(:name AS text)), 'SELECT'),
           has_table_privilege(format('%I.%I', coalesce(CAST(:schema AS text), current_schema()), CAST(:name AS text)), 'DELETE')
""")
PG_HISTORY_PRIVILEGES = sa.text("""
    SELECT n.oid IS NOT NULL AS schema_exists,
           CASE WHEN n.oid IS NULL THEN has_database_privilege(current_database(), 'CREATE')
                ELSE has_schema_privilege(n.oid, 'USAGE') AND has_schema_privilege(n.oid, 'CREATE') END
    FROM (SELECT 1) one LEFT JOIN pg_namespace n ON n.nspname = CAST(:schema AS text)
""")


@dataclass(frozen=True)
class Finding:
    level: str  # ok | info | warning | error
    message: str


def run_checks(conn: sa.Connection, settings, schema: str | None, now: datetime) -> list[Finding]:
    findings: list[Finding] = []
    on_postgres = conn.dialect.name == "postgresql"
    if on_postgres:
        version = conn.scalar(sa.text("SHOW server_version"))
        zone = conn.scalar(sa.text("SHOW TimeZone"))
        findings.append(Finding("info", f"connected: PostgreSQL {version}, session time zone {zone} "
                                        "(cutoffs are computed in UTC whatever it is)"))
    else:
        findings.append(Finding("info", f"connected: SQLite {conn.scalar(sa.text('SELECT sqlite_version()'))}"))

    usable_tables = {}
    for key, spec in TABLES.items():
        try:
            usable_tables[key] = db.bind_table(conn, settings, schema, key)
        except ConfigError as exc:
            findings.append(Finding("error", str(exc)))
            continue
        findings.extend(_column_types(conn, settings, schema, key) if on_postgres else [])
        if on_postgres:
            findings.extend(_privileges(conn, schema, usable_tables[key][0].name))

    for task in TASKS:
        if task.table not in usable_tables:
            continue
        table, columns = usable_tables[task.table]
        due = task.due(columns, task.cutoff(now, settings))
        if on_postgres:
            findings.extend(_index_use(conn, task, table, columns, due, schema))
        backlog = conn.scalar(sa.select(sa.func.count()).select_from(table).where(due))
        if backlog > settings.backlog_warning_rows:
            findings.append(Finding("warning", f"{task.name}: {backlog:,} rows are due; drain them once with "
                                               f"`skybot-cleanup {task.name} --batch-size 10000` before scheduling"))
        else:
            findings.append(Finding("ok", f"{task.name}: {backlog:,} rows due"))

    if settings.history and on_postgres:
        exists, allowed = conn.execute(PG_HISTORY_PRIVILEGES, {"schema": settings.history_schema}).one()
        if not allowed:
            what = "create tables in" if exists else "create"
            findings.append(Finding("warning", f'run history: this role may not {what} schema '
                                               f'"{settings.history_schema}"; grant it, or set '
                                               f"SKYBOT_CLEANUP_HISTORY=false (status then has no history)"))
        else:
            findings.append(Finding("ok", f'run history: schema "{settings.history_schema}" is writable'))
    elif settings.history:
        runs = history_tables("sqlite", settings.history_schema).runs
        findings.append(Finding("ok", f"run history: table {runs.name} (created on first run)"))
    return findings


def _column_types(conn, settings, schema, key) -> list[Finding]:
    spec = TABLES[key]
    name = getattr(settings, f"{key}_table")
    actual = dict(conn.execute(PG_COLUMN_TYPES, {"schema": schema, "name": name}).all())
    findings = []
    for logical, (_default, type_name) in spec.columns.items():
        setting = f"{key}_{logical}_column"
        column = getattr(settings, setting)
        found = actual.get(column, "")
        expected = _EXPECTED_TYPES[type_name]
        if not found.startswith(expected) and not (type_name == "text" and found.startswith("character varying")):
            why = (" (a time-zone-aware column would make every cutoff depend on the session's zone)"
                   if type_name == "timestamp" else "")
            findings.append(Finding("error", f'"{name}"."{column}" is {found}, expected {expected}{why} '
                                             f"(setting {env_name(setting)})"))
    if not findings:
        findings.append(Finding("ok", f'"{name}": all {len(spec.columns)} columns present with compatible types'))
    return findings


def _privileges(conn, schema, name) -> list[Finding]:
    can_select, can_delete = conn.execute(PG_PRIVILEGES, {"schema": schema, "name": name}).one()
    missing = [p for p, ok in (("SELECT", can_select), ("DELETE", can_delete)) if not ok]
    if missing:
        qualified = f'"{schema}"."{name}"' if schema else f'"{name}"'
        return [Finding("error", f"the connected role lacks {' and '.join(missing)} on {qualified}: "
                                 f"GRANT {', '.join(missing)} ON {qualified} TO current_user")]
    return []


def _index_use(conn, task, table, columns, due, schema) -> list[Finding]:
    """Could the planner answer the task's predicate from an index? (Seq scans off, so
    the answer does not depend on how small the table is today.)"""
    statement = sa.select(sa.func.count()).select_from(table).where(due)
    compiled = statement.compile(conn)
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params).scalars())
    conn.exec_driver_sql("SET LOCAL enable_seqscan = on")
    if "Seq Scan" not in plan:
        return [Finding("ok", f"{task.name}: the planner can use an index for its predicate")]
    indexed = {cols[0] for cols in (ix["column_names"] for ix in sa.inspect(conn).get_indexes(table.name, schema))
               if cols}
    qualified = f'"{schema}"."{table.name}"' if schema else f'"{table.name}"'
    statements = []
    for logical in (task.age_column, "used") if "used" in columns else (task.age_column,):
        column = columns[logical].name
        if column not in indexed:
            statements.append(f'CREATE INDEX CONCURRENTLY "{table.name}_{column}_idx" ON {qualified} ("{column}");')
    return [Finding("warning", f"{task.name}: its predicate cannot use an index (each run scans the whole table); "
                               f"add: {' '.join(statements)}")]
