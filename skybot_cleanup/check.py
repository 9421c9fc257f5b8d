"""`skybot-cleanup check`: a pre-flight to run before the first install and after every
app migration. Each check is a small function; each finding is something a person
can act on, with the exact statement to run where there is one.

Privileges the tool needs, by mode (what `check` verifies):
- every cleanup, batched or not: SELECT and DELETE on the task's table (no UPDATE:
  batches take no row locks of their own), USAGE on its schema;
- dry runs, metrics, status, check: SELECT on the tables;
- the run history: USAGE and CREATE on the history schema (CREATE on the database
  only if that schema does not exist yet), or, when a DBA creates the tables,
  SELECT, INSERT and DELETE on them and USAGE on their sequences.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from skybot_cleanup import db, health, history, trust
from skybot_cleanup.clock import iso_utc
from skybot_cleanup.cutoff import RunTime, cutoff
from skybot_cleanup.errors import ConfigError, ExitCode, SqlState, sqlstate_of
from skybot_cleanup.registry import REGISTRY, Registry, Task
from skybot_cleanup.results import build_result
from skybot_cleanup.settings import Settings, column_field, env_name
from skybot_cleanup.vocabulary import Level


@dataclass(frozen=True)
class Finding:
    level: Level
    message: str
    detail: tuple[str, ...] = ()  # lines to paste or read, shown indented

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"detail": list(self.detail)}


@dataclass
class Context:
    """What every check may read: the open read-only transaction and what earlier checks found."""

    run: db.RunConnection
    settings: Settings
    schema: str | None
    clocks: RunTime
    registry: Registry
    role: str = ""
    schema_usable: bool | None = None  # None: no such schema (read with the server's facts)
    read_only: bool = False
    schema_unusable: bool = False
    bound: dict[str, db.BoundTable | ConfigError] = field(default_factory=dict)
    # The one judgement of every job (health), read with the checks' own reads: the
    # planner's plan for each predicate, the rows of tables never analyzed.
    judgement: health.Judgement | None = None
    plans: dict[str, db.Pending] = field(default_factory=dict)
    rows: dict[str, db.CountReading] = field(default_factory=dict)
    # Per task with a narrowing index: the rows its walk passes over, and the table's indexes.
    passed_over: dict[str, db.CountReading] = field(default_factory=dict)
    index_columns: dict[str, db.Pending] = field(default_factory=dict)

    def tables(self) -> Iterator[db.BoundTable]:
        """Every task table that exists, once, in registry order."""
        for spec in self.registry.tables:
            table = self.bound.get(spec.key)
            if isinstance(table, db.BoundTable):
                yield table

    def readable(self, key: str) -> db.BoundTable | None:
        """The bound table, when it exists and the role may read it (checks that query it
        skip the rest: the privilege check has already said what to GRANT)."""
        table = self.bound.get(key)
        if table is None or isinstance(table, ConfigError) or not table.info.can_select:
            return None
        return table

    @property
    def now(self) -> datetime:
        return self.clocks.now

    @property
    def conn(self) -> sa.Connection:
        return self.run.conn

    @property
    def on_postgres(self) -> bool:
        return self.run.on_postgres


Check = Callable[[Context], Iterator[Finding]]


def _shown(table: db.BoundTable) -> str:
    """Schema-qualified as the database resolved it, so a GRANT cannot hit another table."""
    return db.qualified(table.info.schema, table.info.name) if table.info.schema else table.shown


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def server(ctx: Context) -> Iterator[Finding]:
    if not ctx.on_postgres:
        yield Finding(Level.INFO, f"connected: SQLite {ctx.conn.scalar(sa.text('SELECT sqlite_version()'))}")
        return
    row = ctx.conn.execute(
        sa.text(
            "SELECT pg_catalog.current_setting('server_version'), pg_catalog.current_setting('TimeZone'), "
            "current_user, pg_catalog.pg_is_in_recovery(), "
            "pg_catalog.current_setting('default_transaction_read_only') = 'on', "
            "coalesce((SELECT ssl FROM pg_catalog.pg_stat_ssl WHERE pid = pg_catalog.pg_backend_pid()), false), "
            "(SELECT setting::bigint FROM pg_catalog.pg_settings "
            " WHERE name = 'idle_in_transaction_session_timeout'), "
            "(SELECT pg_catalog.has_schema_privilege(oid, 'USAGE') FROM pg_catalog.pg_namespace "
            " WHERE nspname = :schema), "
            # The physical standbys, and how many of them this role may see the positions of.
            "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_replication r JOIN pg_catalog.pg_stat_activity a "
            " ON a.pid = r.pid AND a.datid IS NULL), "
            "(SELECT pg_catalog.count(r.replay_lsn) FROM pg_catalog.pg_stat_replication r "
            " JOIN pg_catalog.pg_stat_activity a ON a.pid = r.pid AND a.datid IS NULL)"
        ),
        {"schema": ctx.schema},
    ).one()
    version, zone, ctx.role, standby, read_only_default, tls, idle_ms, schema_usable, standbys, visible = row
    ctx.schema_usable = schema_usable
    yield Finding(
        Level.INFO,
        f"connected as {ctx.role}: PostgreSQL {version}, session time zone {zone} "
        f"(cutoffs are computed in UTC whatever it is), {'TLS' if tls else 'no TLS'}",
    )
    yield _clock_finding(ctx)
    if 0 < (idle_ms or 0) < ctx.settings.sleep_ms + 1000:
        yield Finding(
            Level.WARNING,
            f"the server ends a transaction idle for {idle_ms} ms, less than SKYBOT_CLEANUP_SLEEP_MS "
            f"({ctx.settings.sleep_ms} ms) plus a second: batched runs would be cut short after "
            "one batch; lower SKYBOT_CLEANUP_SLEEP_MS",
        )
    if standbys:
        yield _standbys_finding(ctx, int(standbys), int(visible))
    if standby or read_only_default:
        ctx.read_only = True
        what = "a hot standby" if standby else "read-only (default_transaction_read_only is on)"
        yield Finding(
            Level.ERROR,
            f"the database is {what}: every cleanup would fail; point DATABASE_URL at the "
            "primary (with several hosts, add target_session_attrs=read-write)",
        )


def _standbys_finding(ctx: Context, standbys: int, visible: int) -> Finding:
    """Replica pacing needs the standbys' replay positions, which only pg_read_all_stats
    (pg_monitor includes it) or a superuser may read."""
    target, setting = ctx.settings.max_replica_lag_s, env_name("max_replica_lag_s")
    counted = f"{standbys} streaming standby" + ("s" if standbys > 1 else "")
    if not target:
        return Finding(Level.INFO, f"{counted}: replica pacing is off ({setting}=0), so batches do not wait for them")
    if visible == standbys:
        its = "their replay lag" if standbys > 1 else "its replay lag"
        return Finding(Level.OK, f"{counted}, {its} visible: batched runs keep it under {target:g} s ({setting})")
    return Finding(
        Level.WARNING,
        f"{counted}, but {ctx.role} cannot read their replay positions, so batched runs cannot keep their lag "
        f"under {target:g} s ({setting}). As a superuser, run (pg_read_all_stats is the narrowest role that "
        "shows them; pg_monitor includes it):",
        (f"GRANT pg_read_all_stats TO {_quote(ctx.role)};",),
    )


def _clock_finding(ctx: Context) -> Finding:
    clocks, threshold = ctx.clocks, ctx.settings.clock_skew_warning_s
    skew = clocks.skew_s or 0.0
    relation = f"{abs(skew):.3f} s {'ahead of' if skew > 0 else 'behind'} the server's"
    if abs(skew) <= threshold:
        return Finding(Level.OK, f"clocks agree: this host's is {relation} (warning above {threshold:g} s)")
    return Finding(
        Level.WARNING,
        f"this host's clock is {relation} (host {iso_utc(clocks.host)}, server {iso_utc(clocks.server)}): runs "
        "take the earlier of the two, so no valid row is deleted, but due rows wait for the later one; fix the "
        f"clock (NTP) (warning above {threshold:g} s, {env_name('clock_skew_warning_s')})",
    )


def heartbeat_url(ctx: Context) -> Iterator[Finding]:
    """A ping URL that cannot work turns heartbeats off (a warning at run time): here, an error."""
    from skybot_cleanup.heartbeat import check_url

    if ctx.settings.ping_url is not None:
        problem = check_url(ctx.settings.ping_url.get_secret_value())
        if problem:
            yield Finding(Level.ERROR, f"{env_name('ping_url')} is unusable: {problem}; no heartbeat is sent")


def schema_usage(ctx: Context) -> Iterator[Finding]:
    """The role must be able to use the app's schema, or every table looks missing."""
    if not ctx.on_postgres or ctx.schema_usable:
        return
    ctx.schema_unusable = True
    if ctx.schema_usable is None:
        yield Finding(
            Level.ERROR,
            f'schema "{ctx.schema}" does not exist: set the URL\'s ?schema= or SKYBOT_CLEANUP_SCHEMA '
            "to the app's schema",
        )
        return
    yield Finding(
        Level.ERROR,
        f'{ctx.role} may not use schema "{ctx.schema}" (no USAGE), so none of its tables can be '
        "seen: as its owner or a superuser, run",
        (f"GRANT USAGE ON SCHEMA {_quote(str(ctx.schema))} TO {_quote(ctx.role)};",),
    )


def tables(ctx: Context) -> Iterator[Finding]:
    """Also reads, in one go, everything the later checks look at: the judgement of every
    job (backlogs counted up to the warning threshold), each predicate's plan, the rows
    of tables never analyzed."""
    if ctx.schema_unusable:
        return
    threshold = ctx.settings.backlog_warning_rows
    judging = health.Judging(ctx.run, ctx.settings, ctx.schema, ctx.now, ctx.registry, cap=threshold)
    ctx.bound = judging.bound
    for task in ctx.registry.tasks:
        readable = ctx.readable(task.table.key)
        if readable is not None and ctx.on_postgres:
            due = task.due(readable.columns, cutoff(task, ctx.now, ctx.settings))
            ctx.plans[task.name] = judging.reads.add(sa.select(sa.func.count()).where(due), explain=True)
            if readable.info.estimated_rows is None and task.table.key not in ctx.rows:
                ctx.rows[task.table.key] = db.CountReading(
                    judging.reads, readable, sa.true(), cap=ctx.settings.index_advice_rows
                )
            if task.narrowing_index and task.walk_column:
                walk = readable.columns[task.walk_column]
                moment = cutoff(task, ctx.now, ctx.settings)
                passed = sa.and_(walk < moment, sa.not_(due))
                ctx.passed_over[task.name] = db.CountReading(
                    judging.reads, readable, passed, order_by=walk, cap=ctx.settings.index_advice_rows
                )
                ctx.index_columns[task.name] = judging.reads.add(
                    INDEX_COLUMNS.bindparams(schema=readable.info.schema, name=readable.info.name)
                )
    counted = [*judging.counts.values(), *ctx.rows.values(), *ctx.passed_over.values()]
    db.read_counts(judging.reads, counted)
    ctx.judgement = judging.verdict()
    for spec in ctx.registry.tables:
        table = ctx.bound.get(spec.key)
        if table is None or isinstance(table, ConfigError):
            yield Finding(Level.ERROR, str(table))
            continue
        problems = []
        for role, column in spec.roles.items():
            name = ctx.settings.column_name(spec, role)
            found = table.info.columns[name].lower()
            expected = db.SQL_TYPES[column.type].catalog
            compatible = found.startswith(expected) and not found.endswith("with time zone")
            if ctx.on_postgres and not compatible:
                why = (
                    " (a time-zone-aware column would make every cutoff depend on the session's zone)"
                    if column.type == "timestamp"
                    else ""
                )
                problems.append(
                    Finding(
                        Level.ERROR,
                        f'{_shown(table)}."{name}" is {found}, expected {expected[0]}{why} '
                        f"(setting {env_name(column_field(spec, role))})",
                    )
                )
        yield from problems or [
            Finding(
                Level.OK,
                f"{_shown(table)}: the {len(spec.roles)} columns the tool reads are present with compatible types",
            )
        ]


def privileges(ctx: Context) -> Iterator[Finding]:
    if not ctx.on_postgres:
        return
    for table in ctx.tables():
        shown = _shown(table)
        missing = [
            name for name, ok in (("SELECT", table.info.can_select), ("DELETE", table.info.can_delete)) if not ok
        ]
        if missing:
            yield Finding(
                Level.ERROR,
                f"{ctx.role} lacks {' and '.join(missing)} on {shown}: every run of its tasks fails until, as its "
                "owner or a superuser, you run",
                (f"GRANT {', '.join(missing)} ON {shown} TO {_quote(ctx.role)};",),
            )
        else:
            yield Finding(Level.OK, f"{ctx.role} may SELECT and DELETE on {shown} (all a cleanup needs; no UPDATE)")


def role_standing(ctx: Context) -> Iterator[Finding]:
    """What the role holds beyond a cleanup's needs: every run would fire the tables'
    triggers, and their owners' code, with all of it."""
    if not ctx.on_postgres:
        return
    found: list[str] = []
    for table in ctx.tables():
        found += [item for item in trust.beyond_need(table.info, _shown(table)) if item not in found]
    if not found:
        yield Finding(Level.OK, f"{ctx.role} holds nothing beyond what a cleanup needs")
        return
    yield Finding(
        Level.WARNING,
        f"{ctx.role} holds more than a cleanup needs: {'; '.join(found)}. Every run would fire the tables' triggers "
        "with all of it. As a superuser, make a least-privilege role and put it in DATABASE_URL:",
        _least_privilege_role(ctx),
    )


def _least_privilege_role(ctx: Context) -> tuple[str, ...]:
    role, schema = _quote("skybot_cleanup"), _quote(str(ctx.schema))
    tables = [_shown(table) for table in ctx.bound.values() if isinstance(table, db.BoundTable)]
    history_schema = _quote(ctx.settings.history_schema)
    return (
        f"CREATE ROLE {role} LOGIN PASSWORD '<a new password>';",
        f"GRANT USAGE ON SCHEMA {schema} TO {role};",
        f"GRANT SELECT, DELETE ON {', '.join(tables)} TO {role};",
        f"CREATE SCHEMA IF NOT EXISTS {history_schema}; ALTER SCHEMA {history_schema} OWNER TO {role};",
        f"GRANT pg_read_all_stats TO {role};  -- only to keep streaming standbys' lag in bounds",
    )


def triggers(ctx: Context) -> Iterator[Finding]:
    """The code each run fires as it deletes, whose it is, and whether it may run."""
    if not ctx.on_postgres:
        return
    for table in ctx.tables():
        problem = trust.code_problem(table, ctx.settings.trusted_code)
        if problem:
            yield Finding(Level.ERROR, f"{problem}; until then, runs refuse to start (exit {ExitCode.CONFIG})")
            continue
        firing = [code for code in table.info.code if code.fires_on(db.DELETE)]
        if firing:
            listed = "; ".join(
                f"{code} ({'trusted' if code.name in ctx.settings.trusted_code else 'safe'})" for code in firing
            )
            yield Finding(Level.INFO, f"{_shown(table)}: each run fires {listed}")


def row_level_security(ctx: Context) -> Iterator[Finding]:
    """Row-level security hides rows without an error: runs would delete, and counts see,
    only what its policies allow this role, forever."""
    for table in ctx.tables():
        if not table.info.rls_hides_rows:
            continue
        shown, role = _shown(table), _quote(ctx.role)
        forced = " (and forced, so even its owner is subject to it)" if table.info.rls_forced else ""
        yield Finding(
            Level.ERROR,
            f"row-level security is on for {shown}{forced}, and {ctx.role} is neither its owner, nor BYPASSRLS, "
            "nor a superuser: runs delete, and counts see, only the rows its policies allow this role, so due "
            "rows stay and backlogs read low. Either, as a superuser, exempt the role, or, as the table's owner, "
            "let it see every row (restrictive policies still apply):",
            (
                f"ALTER ROLE {role} BYPASSRLS;",
                f"CREATE POLICY skybot_cleanup ON {shown} FOR ALL TO {role} USING (true);",
            ),
        )


def indexes(ctx: Context) -> Iterator[Finding]:
    if not ctx.on_postgres:
        return
    for task in ctx.registry.tasks:
        table = ctx.readable(task.table.key)
        if table is None:
            continue
        due = task.due(table.columns, cutoff(task, ctx.now, ctx.settings))
        plan = ctx.plans.get(task.name)
        if plan is not None and plan.error is None and not _scans_the_table(plan.scalar()):
            yield Finding(Level.OK, f"{task.name}: the planner can use an index for its predicate")
            continue
        yield _index_advice(ctx, task, table, due)


# The columns of each index of a table, in the index's order.
INDEX_COLUMNS = sa.text("""
    SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.n)
    FROM pg_catalog.pg_index i
    JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
    JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace
    CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE ns.nspname = :schema AND c.relname = :name
    GROUP BY i.indexrelid
""")


def narrowing_indexes(ctx: Context) -> Iterator[Finding]:
    """The hourly run's count reads every row of the walk column's range up to the cutoff,
    the ones the predicate then leaves too (refresh-tokens: revoked tokens, kept 90 days):
    its cost grows with the audit window. Measured here, with the index that removes it
    (an index-only scan of due rows), as a schema.prisma change."""
    for task in ctx.registry.tasks:
        table, passed = ctx.readable(task.table.key), ctx.passed_over.get(task.name)
        if table is None or passed is None or passed.error is not None or not task.narrowing_index:
            continue
        wanted = [ctx.settings.column_name(task.table, role) for role in task.narrowing_index]
        listed = ctx.index_columns[task.name]
        indexes = [list(row[0]) for row in listed.rows] if listed.error is None else []
        walk_index = f'"{table.info.name}_{wanted[0]}_idx"'
        if any(columns[: len(wanted)] == wanted for columns in indexes):
            yield Finding(Level.OK, f"{task.name}: an index on ({', '.join(wanted)}) lets each run read only due rows")
            continue
        count = passed.count()
        if count.value == 0:
            continue
        over = f"~{count.value:,}" if count.estimated else f"{count.value:,}"
        model = table.info.name
        level = Level.WARNING if count.value > ctx.settings.index_advice_rows else Level.INFO
        yield Finding(
            level,
            f"{task.name}: each run reads {over} rows it does not delete through {walk_index} to find the due ones "
            f"(a cost that grows with them). Add to `model {model}` in the app's prisma/schema.prisma, and ship it "
            "as a Prisma migration, to make that an index-only scan of due rows:",
            (
                f"  @@index([{', '.join(wanted)}])",
                f'Prisma writes: CREATE INDEX "{model}_{"_".join(wanted)}_idx" ON "{model}"'
                f"({', '.join(chr(34) + name + chr(34) for name in wanted)});",
            ),
        )


def _scans_the_table(plan: Any) -> bool:
    """Does the plan read the whole table? Read under the check's planner settings (seq
    scans off, as a walk's count), so the answer does not depend on how small the table
    is today: a sequential scan is there only when no index can serve."""
    found = False

    def visit(node: dict[str, Any]) -> None:
        nonlocal found
        found = found or node.get("Node Type") == "Seq Scan"
        for child in node.get("Plans", ()):
            visit(child)

    visit(plan[0]["Plan"])
    return found


def _index_advice(ctx: Context, task: Task, table: db.BoundTable, due: sa.ColumnElement[bool]) -> Finding:
    """The change for the app's schema.prisma, never bare DDL: an index the app did not
    declare breaks its next `prisma migrate deploy` (Prisma's own name) or shows up as
    drift (any other name)."""
    used = [column.name for column in sa.sql.visitors.iterate(due) if isinstance(column, sa.Column)]
    indexed = set(task.table.indexes) | set(task.table.unique)
    wanted = [name for name in dict.fromkeys(used) if name not in indexed]
    counted = ctx.rows.get(task.table.key)
    rows = table.info.estimated_rows or (counted.count().value if counted is not None and counted.error is None else 0)
    model = table.info.name
    if rows < ctx.settings.index_advice_rows:
        return Finding(
            Level.INFO,
            f"{task.name}: its predicate cannot use an index, so each run scans {_shown(table)} "
            f"(~{rows:,} rows: fine below {ctx.settings.index_advice_rows:,}, "
            f"{env_name('index_advice_rows')})",
        )
    prisma = tuple(f"  @@index([{name}])" for name in wanted)
    sql = tuple(f'  CREATE INDEX "{model}_{name}_idx" ON "{model}"("{name}");' for name in wanted)
    return Finding(
        Level.WARNING,
        f"{task.name}: its predicate cannot use an index, and {_shown(table)} has ~{rows:,} "
        "rows: each run scans the whole table. Add to `model " + model + "` in the app's "
        "prisma/schema.prisma (field names; adjust if they are @map'ed):",
        (
            *prisma,
            "then ship it as a Prisma migration (npx prisma migrate dev --name "
            f"{model.lower()}_cleanup_index; deploys apply it with prisma migrate deploy). "
            "Prisma writes this into the migration (for review; never run it by hand):",
            *sql,
        ),
    )


# Past this many rows a table is worth a look at time partitioning (docs/scaling.md).
PARTITIONING_HINT_ROWS = 50_000_000


def partitioning(ctx: Context) -> Iterator[Finding]:
    """The table's shape, and what runs do with it: partitions and inheritance children
    are each walked (every row matched to its leaf); very large plain tables get a pointer
    to the partitioning design."""
    if not ctx.on_postgres:
        return
    for table in ctx.tables():
        if table.info.shape is db.TableShape.PARTITIONED:
            yield Finding(
                Level.INFO,
                f"{_shown(table)} is partitioned ({table.info.leaves} partitions): batches walk every partition, "
                "sized from the partitions' own statistics, and delete row by row; detaching and dropping whole "
                "expired partitions is the app's migrations' job (docs/scaling.md)",
            )
        elif table.info.shape is db.TableShape.INHERITED:
            yield Finding(
                Level.INFO,
                f"{_shown(table)} has {table.info.leaves - 1} inheritance child table(s) (INHERITS): batches walk "
                "the heap of the table and of every child (their indexes are their own), and every count covers "
                "them all",
            )
        elif (table.info.estimated_rows or 0) >= PARTITIONING_HINT_ROWS:
            yield Finding(
                Level.INFO,
                f"{_shown(table)} holds ~{table.info.estimated_rows:,} rows: at this size vacuum "
                "and WAL, not the DELETE, bound a row-by-row cleanup; docs/scaling.md weighs time "
                "partitioning",
            )


def backlogs(ctx: Context) -> Iterator[Finding]:
    """Each task's backlog as the one judgement measured it (counted up to the warning
    threshold, not estimated: stale statistics must not hide a backlog)."""
    if ctx.judgement is None:
        return
    threshold = ctx.settings.backlog_warning_rows
    for task in ctx.registry.tasks:
        judged = ctx.judgement.job(task.name)
        backlog = judged.backlog
        table = ctx.bound.get(task.table.key)
        if isinstance(table, ConfigError):
            yield Finding(Level.ERROR, f"{task.name}: cannot run: {table}")
            continue
        if backlog is None or backlog.due is None:
            # Refused by the server (a run would meet the same refusal): an error; not
            # counted on purpose (row-level security, no SELECT), named above: information.
            level = Level.ERROR if backlog is not None and backlog.failed else Level.INFO
            yield Finding(level, f"{task.name}: due rows not counted: {backlog.unmeasurable if backlog else None}")
            continue
        if backlog.due.value > threshold:
            yield Finding(
                Level.WARNING,
                f"{task.name}: more than {threshold:,} rows are due; drain them once in batches before scheduling:",
                (f"skybot-cleanup {task.name} --batch-size 10000 --max-runtime 1800",),
            )
        else:
            yield Finding(Level.OK, f"{task.name}: {backlog.due.value:,} rows due")


def history_writable(ctx: Context) -> Iterator[Finding]:
    """A real write to the history, rolled back: the only proof that it works. Not where
    another role's code could run as this role (trust.history_problem): that is an error."""
    settings = ctx.settings
    if not settings.history:
        yield Finding(Level.INFO, "run history is off (SKYBOT_CLEANUP_HISTORY=false): status cannot judge the jobs")
        return
    refused = ctx.judgement.history_refused if ctx.judgement else None
    if refused:
        yield Finding(Level.ERROR, f"run history: {refused}; until then runs refuse to start (exit {ExitCode.CONFIG})")
        return
    if ctx.read_only:
        return
    tables = history.history_tables(ctx.conn.dialect.name, settings.history_schema)
    shown = db.qualified(tables.runs.schema, tables.runs.name)
    run = ctx.run
    run.commit()
    run.read_only = False
    run.begin()
    try:
        try:
            info = db.lookup_table(ctx.conn, tables.runs.schema, tables.runs.name)
            if info is None:
                history.ensure_tables(ctx.conn, tables, settings.history_schema, settings.history_owner)
            missing = [column for column in tables.runs.columns if info is not None and column.name not in info.columns]
            probe = build_result("check", "check", started_at=ctx.now, clock_started=time.monotonic(), failure=None)
            row = history.history_row(probe, host="check")
            ctx.conn.execute(tables.runs.insert(), {k: v for k, v in row.items() if k not in {c.name for c in missing}})
            ctx.conn.execute(sa.delete(tables.runs).where(tables.runs.c.run_id == "check"))
        except (sa.exc.DBAPIError, ConfigError) as exc:
            if run.on_postgres:
                run.undo_work()
            reason = str(exc) if isinstance(exc, ConfigError) else str(exc.orig).strip().splitlines()[0]
            yield _history_advice(ctx, shown, reason)
            return
        created = "" if info is not None else " (created on the first run)"
        yield Finding(Level.OK, f"run history: {shown} is writable{created}")
        if missing and info is not None:
            yield _missing_columns(ctx, info, missing)
    finally:
        run.rollback()
        run.read_only = True
        run.begin()


def _missing_columns(ctx: Context, info: db.TableInfo, missing: list[sa.Column[Any]]) -> Finding:
    """A runs table an earlier release made: every command reads around the columns it
    lacks; the first run its owner's role makes adds them, or its owner does."""
    shown, names = db.qualified(info.schema, info.name), ", ".join(column.name for column in missing)
    if info.owned:
        return Finding(
            Level.INFO, f"run history: {shown} lacks {names} (an earlier release made it); the next run adds them"
        )
    dialect = ctx.conn.dialect
    return Finding(
        Level.WARNING,
        f"run history: {shown} lacks {names} (an earlier release made it), and {ctx.role} does not own it: runs "
        f"record what it has, and drop the rest. As its owner, {info.owner}, run:",
        tuple(
            f'ALTER TABLE {shown} ADD COLUMN IF NOT EXISTS "{column.name}" {column.type.compile(dialect=dialect)};'
            for column in missing
        ),
    )


def _history_advice(ctx: Context, shown: str, error: str) -> Finding:
    schema = ctx.settings.history_schema
    role = _quote(ctx.role)
    statements: tuple[str, ...] = ()
    if ctx.on_postgres:
        exists = db.schema_exists(ctx.conn, schema)
        statements = (
            (
                f"GRANT USAGE, CREATE ON SCHEMA {_quote(schema)} TO {role};",
                f"GRANT SELECT, INSERT, DELETE ON ALL TABLES IN SCHEMA {_quote(schema)} TO {role};",
                f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {_quote(schema)} TO {role};",
            )
            if exists
            else (f"CREATE SCHEMA {_quote(schema)} AUTHORIZATION {role};",)
        )
    return Finding(
        Level.WARNING,
        f"run history: cannot write {shown}: {error}. Runs are kept in the state "
        f"directory meanwhile, and status cannot judge the jobs. As an administrator, run "
        f"(or set SKYBOT_CLEANUP_HISTORY=false):",
        statements,
    )


CHECKS: tuple[Check, ...] = (
    heartbeat_url,
    server,
    schema_usage,
    tables,
    privileges,
    role_standing,
    triggers,
    row_level_security,
    indexes,
    narrowing_indexes,
    partitioning,
    backlogs,
    history_writable,
)


# Checks that end and begin the transaction themselves (no savepoint can span them).
OWN_TRANSACTION: tuple[Check, ...] = (history_writable,)


def run_checks(
    run: db.RunConnection, settings: Settings, schema: str | None, clocks: RunTime, registry: Registry = REGISTRY
) -> list[Finding]:
    """Every check's findings. A check the role lacks a privilege for is an error finding
    of its own, and the others still run: the point of `check` is the whole list. (Its
    reads are read-only: undoing what the transaction did since it began loses nothing.)"""
    ctx = Context(run=run, settings=settings, schema=schema, clocks=clocks, registry=registry)
    findings: list[Finding] = []
    for check in CHECKS:
        try:
            findings += list(check(ctx))
        except sa.exc.DBAPIError as exc:
            if sqlstate_of(exc) != SqlState.INSUFFICIENT_PRIVILEGE or check in OWN_TRANSACTION:
                raise
            run.undo_work()
            reason = str(exc.orig).strip().splitlines()[0]
            findings.append(Finding(Level.ERROR, f"{check.__name__.replace('_', ' ')}: not checked: {reason}"))
    return findings
