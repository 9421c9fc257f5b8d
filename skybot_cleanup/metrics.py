"""`skybot-cleanup metrics`: one cheap snapshot of backlogs, sessions and table health.

Every count of due rows goes through the same predicate as the cleanup, so it uses
the same index; table totals are the planner's estimates (marked as such); the
only scans of a whole table are on "MagicLink", which the app never indexed by
expiry and which stays small when magic-links runs.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from skybot_cleanup import db, history
from skybot_cleanup.cleanup import iso_utc
from skybot_cleanup.schedule import is_overdue
from skybot_cleanup.tasks import TABLES, TASKS, TASKS_BY_NAME

# Queries about tables, kept apart from the code that shapes their results.
PG_TABLE_HEALTH = sa.text("""
    SELECT c.reltuples::bigint AS estimated_rows,
           pg_total_relation_size(c.oid) AS size_bytes,
           s.n_dead_tup AS dead_tuples,
           s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze
    FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
    WHERE c.oid = to_regclass(format('%I.%I', coalesce(CAST(:schema AS text), current_schema()), CAST(:name AS text)))
""")
PG_DATABASE_SIZE = sa.text("SELECT pg_database_size(current_database())")
SQLITE_DATABASE_SIZE = sa.text("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")


def _seconds(delta: timedelta) -> float:
    return round(delta.total_seconds(), 3)


def collect(conn: sa.Connection, settings, schema: str | None, now: datetime) -> dict:
    """The snapshot as plain data (JSON-ready): what --json prints and history stores."""
    started = time.perf_counter()
    conn.exec_driver_sql("SELECT 1")
    latency = time.perf_counter() - started
    on_postgres = conn.dialect.name == "postgresql"
    bound = {key: db.bind_table(conn, settings, schema, key) for key in TABLES}

    def count(table_key: str, *where) -> int:
        table, _ = bound[table_key]
        return conn.scalar(sa.select(sa.func.count()).select_from(table).where(*where))

    tokens = bound["refresh_token"][1]
    links = bound["magic_link"][1]
    keys = bound["idempotency_key"][1]
    stuck_before = now - timedelta(minutes=settings.idempotency_stuck_minutes)
    snapshot: dict = {
        "taken_at": now.isoformat(timespec="milliseconds") + "Z",
        "active_sessions": count("refresh_token", tokens["revoked_at"].is_(None), tokens["expires_at"] >= now),
        "live_magic_links": count("magic_link", links["used"] == False,  # noqa: E712
                                  links["expires_at"] >= now),
        # Only keys not yet expired: the index on expiresAt bounds the scan, and expired
        # keys are the idempotency-keys backlog, counted below.
        "idempotency_keys_in_progress": count("idempotency_key", keys["status_code"].is_(None),
                                              keys["expires_at"] >= now),
        "idempotency_keys_stuck": count("idempotency_key", keys["status_code"].is_(None),
                                        keys["expires_at"] >= now, keys["created_at"] < stuck_before),
        "database": {
            "size_bytes": conn.scalar(PG_DATABASE_SIZE if on_postgres else SQLITE_DATABASE_SIZE),
            "latency_seconds": round(latency, 6),
        },
        "tables": {},
        "tasks": {},
    }
    for key, (table, _columns) in bound.items():
        snapshot["tables"][getattr(settings, f"{key}_table")] = _table_health(conn, table, key, schema, count)

    histories = history.task_histories(conn, settings, [task.name for task in TASKS])
    for name, (due_count, oldest_age) in task_backlogs(conn, settings, schema, now, bound).items():
        task, past = TASKS_BY_NAME[name], histories[name]
        snapshot["tasks"][name] = {
            "schedule": task.schedule,
            "due_rows": due_count,
            "oldest_due_age_seconds": oldest_age,
            "last_success_at": iso_utc(past.last_success_at),
            "last_rows": past.last_success_rows,
            "last_status": past.last_status,
            "overdue": is_overdue(task.schedule, past.last_success_at, now),
        }
    return snapshot


def task_backlogs(conn: sa.Connection, settings, schema: str | None, now: datetime,
                  bound: dict | None = None) -> dict[str, tuple[int, float]]:
    """Per task: rows due now (through its own predicate and index) and how long the
    oldest has been due, in seconds (0 when only "used" magic links are due)."""
    bound = bound or {key: db.bind_table(conn, settings, schema, key) for key in TABLES}
    backlogs = {}
    for task in TASKS:
        _table, columns = bound[task.table]
        cutoff = task.cutoff(now, settings)
        due_count, oldest = conn.execute(
            sa.select(sa.func.count(), sa.func.min(columns[task.age_column])).where(task.due(columns, cutoff))
        ).one()
        backlogs[task.name] = (due_count, max(0.0, _seconds(cutoff - oldest)) if oldest else 0.0)
    return backlogs


def _table_health(conn, table, key, schema, count) -> dict:
    if conn.dialect.name != "postgresql":
        return {"rows": count(key), "rows_estimated": False, "size_bytes": None, "dead_tuples": None,
                "last_vacuum": None, "last_autovacuum": None, "last_analyze": None, "last_autoanalyze": None}
    row = conn.execute(PG_TABLE_HEALTH, {"schema": schema, "name": table.name}).mappings().one()
    estimated = row["estimated_rows"] >= 0  # -1: never analyzed, so no estimate exists yet
    return {
        "rows": row["estimated_rows"] if estimated else count(key),
        "rows_estimated": estimated,
        "size_bytes": row["size_bytes"],
        "dead_tuples": row["dead_tuples"],
        **{name: iso_utc(row[name]) for name in ("last_vacuum", "last_autovacuum", "last_analyze", "last_autoanalyze")},
    }


def prometheus_registry(snapshot: dict):
    """The snapshot in Prometheus exposition terms (official client library)."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()):
        return Gauge(f"skybot_cleanup_{name}", doc, labels, registry=registry)

    gauge("active_sessions", "Refresh tokens neither revoked nor expired.").set(snapshot["active_sessions"])
    gauge("live_magic_links", "Magic links neither used nor expired.").set(snapshot["live_magic_links"])
    gauge("idempotency_keys_in_progress", "Unexpired idempotency keys whose request has not finished.").set(
        snapshot["idempotency_keys_in_progress"])
    gauge("idempotency_keys_stuck", "In-progress idempotency keys older than the stuck threshold.").set(
        snapshot["idempotency_keys_stuck"])
    gauge("database_size_bytes", "Size of the database on disk.").set(snapshot["database"]["size_bytes"] or 0)
    gauge("query_latency_seconds", "Round trip of SELECT 1.").set(snapshot["database"]["latency_seconds"])

    due = gauge("due_rows", "Rows the next run of the task would delete.", ("task",))
    age = gauge("oldest_due_age_seconds", "How long the oldest due row has been due.", ("task",))
    overdue = gauge("task_overdue", "1 when the task has had no success within two scheduled intervals.",
                    ("task",))
    last_success = gauge("task_last_success_timestamp_seconds",
                         "Last successful run according to the run history.", ("task",))
    for name, task in snapshot["tasks"].items():
        due.labels(name).set(task["due_rows"])
        age.labels(name).set(task["oldest_due_age_seconds"])
        overdue.labels(name).set(int(task["overdue"]))
        if task["last_success_at"]:
            last_success.labels(name).set(_epoch(task["last_success_at"]))

    rows = gauge("table_rows", "Rows in the table (planner estimate on PostgreSQL).", ("table",))
    size = gauge("table_size_bytes", "Table size on disk, indexes and TOAST included.", ("table",))
    dead = gauge("table_dead_tuples", "Dead tuples waiting for vacuum.", ("table",))
    vacuumed = gauge("table_last_vacuum_timestamp_seconds", "Last (auto)vacuum of the table.", ("table",))
    analyzed = gauge("table_last_analyze_timestamp_seconds", "Last (auto)analyze of the table.", ("table",))
    for name, table in snapshot["tables"].items():
        rows.labels(name).set(table["rows"])
        if table["size_bytes"] is not None:
            size.labels(name).set(table["size_bytes"])
        if table["dead_tuples"] is not None:
            dead.labels(name).set(table["dead_tuples"])
        for metric, keys in ((vacuumed, ("last_vacuum", "last_autovacuum")),
                             (analyzed, ("last_analyze", "last_autoanalyze"))):
            moments = [_epoch(table[k]) for k in keys if table[k]]
            if moments:
                metric.labels(name).set(max(moments))
    return registry


def run_registry(results, histories: dict) -> object:
    """What cleanup runs expose: the batch-job metrics node_exporter users expect."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    labels = ("task",)
    last_success = Gauge("skybot_cleanup_last_success_timestamp_seconds",
                         "Unix time of the task's last successful run.", labels, registry=registry)
    last_run = Gauge("skybot_cleanup_last_run_timestamp_seconds", "Unix time of the task's last run.", labels,
                     registry=registry)
    duration = Gauge("skybot_cleanup_last_duration_seconds", "Duration of the task's last run.", labels,
                     registry=registry)
    rows = Gauge("skybot_cleanup_last_rows", "Rows deleted (or counted, dry run) by the last run.", labels,
                 registry=registry)
    status = Gauge("skybot_cleanup_last_exit_code", "Exit code of the task's last run (0 ok, 75 skipped).", labels,
                   registry=registry)
    for result, finished in results:
        last_run.labels(result.task).set(finished.timestamp())
        duration.labels(result.task).set(result.duration_ms / 1000)
        rows.labels(result.task).set(result.rows)
        status.labels(result.task).set(result.exit_code)
        if result.status == "ok" and not result.dry_run:
            last_success.labels(result.task).set(finished.timestamp())
        elif histories.get(result.task) and histories[result.task].last_success_at:
            last_success.labels(result.task).set(_epoch(histories[result.task].last_success_at))
    return registry


def _epoch(moment) -> float:
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.removesuffix("Z"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def write_textfile(path: str, registry) -> None:
    """node_exporter textfile: written to a temporary file and renamed, no timestamps."""
    from prometheus_client import write_to_textfile

    write_to_textfile(path, registry)


def push(url: str, registry) -> None:
    from prometheus_client import push_to_gateway

    push_to_gateway(url, job="skybot_cleanup", registry=registry, timeout=10)


def write_run_metrics(settings, results) -> None:
    """After cleanup runs: their textfile(s), with the last success taken from the history
    when this run failed, so a failure does not make the key series vanish."""
    from skybot_cleanup.cleanup import database_target, utc_now

    histories: dict = {}
    if any(result.status != "ok" for result in results):
        try:
            engine = db.create_engine(database_target(settings), settings, "metrics")
            with engine.connect() as conn:
                histories = history.task_histories(conn, settings, [result.task for result in results])
            engine.dispose()
        except Exception:
            pass  # the database may be the very thing that failed
    finished = datetime.now(timezone.utc)
    if os.path.isdir(settings.prom_file) or "{task}" in settings.prom_file:
        for result in results:
            write_textfile(textfile_path(settings.prom_file, result.task),
                           run_registry([(result, finished)], histories))
    else:
        write_textfile(settings.prom_file, run_registry([(result, finished) for result in results], histories))


def textfile_path(setting: str | None, job: str) -> str | None:
    """A directory gets one file per job; {task} in a path is replaced by the job's name."""
    if not setting:
        return None
    if os.path.isdir(setting):
        setting = os.path.join(setting, "skybot_cleanup_{task}.prom")
    return setting.replace("{task}", job)


def render_table(snapshot: dict) -> str:
    """The snapshot for a person at a terminal."""
    lines = [
        f"snapshot {snapshot['taken_at']}  database {_size(snapshot['database']['size_bytes'])}, "
        f"SELECT 1 in {snapshot['database']['latency_seconds'] * 1000:.1f} ms",
        f"active sessions {snapshot['active_sessions']:,}   live magic links {snapshot['live_magic_links']:,}   "
        f"idempotency keys in progress {snapshot['idempotency_keys_in_progress']:,} "
        f"(stuck {snapshot['idempotency_keys_stuck']:,})",
        "",
        f"{'task':<18}{'due rows':>12}{'oldest due':>14}  {'last success':<26}{'last rows':>10}  overdue",
    ]
    for name, task in snapshot["tasks"].items():
        lines.append(f"{name:<18}{task['due_rows']:>12,}{_age(task['oldest_due_age_seconds']):>14}  "
                     f"{task['last_success_at'] or 'never':<26}{task['last_rows'] if task['last_rows'] is not None else '-':>10}"
                     f"  {'YES' if task['overdue'] else 'no'}")
    lines += ["", f"{'table':<18}{'rows':>14}{'size':>10}{'dead':>10}  last vacuum / analyze"]
    for name, table in snapshot["tables"].items():
        rows = f"{'~' if table['rows_estimated'] else ''}{table['rows']:,}"
        vacuum = max(filter(None, (table["last_vacuum"], table["last_autovacuum"])), default="never")
        analyze = max(filter(None, (table["last_analyze"], table["last_autoanalyze"])), default="never")
        dead = "-" if table["dead_tuples"] is None else f"{table['dead_tuples']:,}"
        lines.append(f"{name:<18}{rows:>14}{_size(table['size_bytes']):>10}{dead:>10}  {vacuum} / {analyze}")
    return "\n".join(lines)


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _age(seconds: float) -> str:
    if not seconds:
        return "-"
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f}{unit}"
    return f"{seconds:.0f}s"
