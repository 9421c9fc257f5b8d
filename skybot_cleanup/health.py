"""The one judgement of how each job is doing: its health by its recorded runs, and for a
cleanup its backlog, measured or not measurable (and why). `status`, `metrics` and
`check` render it; none of them judges on its own.

A job is FAILING when its newest run failed, and also when its next run cannot succeed:
its table is missing, or the role lacks a privilege the run needs (SELECT, DELETE), even
while nothing is due. A task whose backlog nobody may count (row-level security hides
rows from the role) cannot be judged: UNKNOWN. Everything is read in two round trips at
most: the catalog, then every history and backlog read at once (db.Reads), plus one for
the planner's estimates when a count passes its cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from skybot_cleanup import db, history, trust
from skybot_cleanup.cutoff import cutoff
from skybot_cleanup.errors import ConfigError, classify
from skybot_cleanup.registry import REGISTRY, Job, Registry, Task
from skybot_cleanup.settings import Settings
from skybot_cleanup.vocabulary import Health


@dataclass(frozen=True)
class Backlog:
    """A task's due rows now, or why they cannot be counted."""

    due: db.Count | None = None
    oldest_due_age_s: float | None = None  # how long the oldest due row has been due (0: only used links)
    unmeasurable: str | None = None
    failed: bool = False  # the server refused the count itself (a run would meet the same refusal)


@dataclass(frozen=True)
class JobHealth:
    job: Job
    health: Health
    past: history.TaskHistory
    backlog: Backlog | None  # cleanup tasks only
    problem: str | None = None  # why it is FAILING or UNKNOWN beyond its runs: what to fix


@dataclass(frozen=True)
class Judgement:
    jobs: list[JobHealth]
    state: history.HistoryState
    bound: dict[str, db.BoundTable | ConfigError]
    history_refused: str | None = None  # why the history was not read (another role's schema or code)
    role_beyond_need: list[str] = field(default_factory=list)  # trust.beyond_need, over the task tables

    def job(self, name: str) -> JobHealth:
        return next(judged for judged in self.jobs if judged.job.name == name)


class Judging:
    """A judgement in progress: the catalog is read at once (one round trip); the history
    and backlog reads are added to `reads`, for the caller to run with its own (metrics
    adds its measures), then `verdict()`."""

    def __init__(
        self,
        run: db.RunConnection,
        settings: Settings,
        schema: str | None,
        now: datetime,
        registry: Registry = REGISTRY,
        *,
        spooled: Sequence[dict[str, Any]] = (),
        unknown: str | None = None,
        cap: int = db.COUNT_CAP,
    ):
        self.settings, self.now, self.registry, self.unknown = settings, now, registry, unknown
        self.reads = db.Reads(run)
        tables = history.history_tables(run.conn.dialect.name, settings.history_schema)
        names = settings.all_table_names(registry)
        app_wanted = [(schema, names[spec.key].table) for spec in registry.tables]
        history_wanted = history.wanted(tables) if settings.history else []
        found = db.lookup_tables(run.conn, app_wanted + history_wanted)
        self.bound = {
            spec.key: db.bind(schema, spec, names[spec.key], info)
            for spec, info in zip(registry.tables, found, strict=False)
        }
        history_found = found[len(app_wanted) :] or [None, None, None]
        # A history another role could run code in is not read (its row-level policies
        # would run as this role): the jobs cannot be judged, and the report says why.
        self.history_problem = (
            trust.history_problem(history_found, settings.history_owner, settings.trusted_code)
            if run.on_postgres and settings.history
            else None
        )
        if self.history_problem:
            history_found, self.unknown = [None, None, None], self.unknown or self.history_problem
        self.history = history.StateReading(
            self.reads, tables, history_found, [job.name for job in registry.jobs], spooled
        )
        self.counts: dict[str, db.CountReading] = {}
        for task in registry.tasks:
            table = self.bound[task.table.key]
            if isinstance(table, db.BoundTable) and _measurable(table) is None:
                due = task.due(table.columns, cutoff(task, now, settings))
                walk = table.columns[task.walk_column] if task.walk_column else None
                oldest = db.min_of(table, table.columns[task.age_column], due)
                self.counts[task.name] = db.CountReading(self.reads, table, due, order_by=walk, cap=cap, also=oldest)

    def verdict(self) -> Judgement:
        """Once the reads have run (run_reads)."""
        state = self.history.state()
        grace = timedelta(minutes=self.settings.grace_minutes)
        jobs = []
        for job in self.registry.jobs:
            past = state.tasks[job.name]
            if job is self.registry.metrics and past.last_success_at is None:
                # Tables made before metrics runs were recorded: its newest snapshot is its last success.
                past.last_success_at = state.last_snapshot_at
            health = state.health(job.name, job.schedule, self.now, grace)
            problem = None
            if self.unknown and health is not Health.FAILING:
                health, problem = Health.UNKNOWN, self.unknown
            backlog = self._backlog(job) if isinstance(job, Task) else None
            if isinstance(job, Task):
                table = self.bound[job.table.key]
                blocked = str(table) if isinstance(table, ConfigError) else trust.privilege_problem(job, table)
                if blocked:
                    health, problem = Health.FAILING, blocked
                elif backlog is not None and backlog.unmeasurable and health is not Health.FAILING:
                    health, problem = Health.UNKNOWN, f"backlog not measurable: {backlog.unmeasurable}"
            jobs.append(JobHealth(job, health, past, backlog, problem))
        beyond: list[str] = []
        for table in self.bound.values():
            if isinstance(table, db.BoundTable) and table.info.schema is not None:
                beyond += [item for item in trust.beyond_need(table.info, table.shown) if item not in beyond]
        return Judgement(jobs, state, self.bound, self.history_problem, beyond)

    def run_reads(self) -> None:
        db.read_counts(self.reads, list(self.counts.values()))

    def _backlog(self, task: Task) -> Backlog:
        table = self.bound[task.table.key]
        if isinstance(table, ConfigError):
            return Backlog(unmeasurable=str(table))
        why = _measurable(table)
        reading = self.counts.get(task.name)
        if why is not None or reading is None:
            return Backlog(unmeasurable=why)
        if reading.error is not None:
            return Backlog(unmeasurable=classify(reading.error).message, failed=True)
        oldest = reading.also
        moment = cutoff(task, self.now, self.settings)
        age = max(0.0, round((moment - oldest).total_seconds(), 3)) if oldest else 0.0
        return Backlog(due=reading.count(), oldest_due_age_s=age)


def _measurable(table: db.BoundTable) -> str | None:
    """Why the backlog of `table` cannot be counted by this role, or None."""
    if not table.info.can_select:
        return f"{table.info.role} may not SELECT from {table.shown}"
    return table.info.rls_warning


def judge(
    run: db.RunConnection,
    settings: Settings,
    schema: str | None,
    now: datetime,
    registry: Registry = REGISTRY,
    **options: Any,
) -> Judgement:
    """Every job's health and backlog, in two or three round trips."""
    judging = Judging(run, settings, schema, now, registry, **options)
    judging.run_reads()
    return judging.verdict()
