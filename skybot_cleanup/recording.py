"""The shell every recorded run shares, a cleanup task and the metrics job alike: its id,
its start and end pings, the failure that ends it, its result, its history row and the
log line it ends with. The work inside is the caller's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog

from skybot_cleanup import db, heartbeat, history, signals
from skybot_cleanup.clock import utc_now
from skybot_cleanup.errors import Failure, Interrupted, classify, is_connection_failure, print_traceback_when_debugging
from skybot_cleanup.logs import get_logger
from skybot_cleanup.results import RunResult, build_result
from skybot_cleanup.settings import Settings
from skybot_cleanup.vocabulary import RunStatus

# The events a run that did not succeed ends its work with, by status.
FAILURE_EVENTS = {RunStatus.SKIPPED: "run_skipped", RunStatus.INTERRUPTED: "interrupted"}


class RecordedRun:
    def __init__(
        self,
        settings: Settings,
        job: str,
        *,
        dry_run: bool = False,
        run_id: str | None = None,
        started_at: datetime | None = None,
    ):
        self.settings = settings
        self.job = job
        self.dry_run = dry_run
        # A UUID: healthchecks.io pairs start and end pings by it (?rid=).
        self.run_id = run_id or str(uuid.uuid4())
        self.started_at = started_at or utc_now()
        self.clock_started = time.monotonic()
        # A dry run tells the monitor nothing about the schedule: it does not ping.
        self.pinger = heartbeat.Pinger.from_settings(settings, job, self.run_id, enabled=not dry_run)
        self.target: db.DatabaseTarget | None = None
        self.engine: sa.Engine | None = None
        # The connection the work holds; the history row goes through it (no second connect).
        self.conn: sa.Connection | None = None
        # The metrics job's snapshot (taken at, JSON), recorded with its run's row.
        self.snapshot: tuple[datetime, str] | None = None
        # How far this host's clock is ahead of the database server's, once read: the
        # run's record is stamped with the server's time, as the history is pruned and
        # judged by it (a host clock that is off must not date a run in the future).
        self.host_ahead = timedelta(0)
        # Why the history may not be written (another role's schema or code): the record
        # then waits in the spool, until an operator makes the history the tool's own.
        self.history_refused: str | None = None
        self.log = get_logger()

    def read_clocks(self, run: db.RunConnection) -> None:
        if run.server_now is not None and run.host_now is not None:
            self.host_ahead = run.host_now - run.server_now

    def secrets(self) -> tuple[str, ...]:
        return (*self.settings.secrets(), *(self.target.secrets if self.target else ()))

    def execute(self, work: Callable[[], None], details: Callable[[], dict[str, Any]] = dict) -> RunResult:
        """Run `work` and record what happened. Expected failures and signals become the
        result's status and exit code, never exceptions. `details` gives the result's
        fields beyond the outcome (rows, cutoff, batches...), as they stand at the end."""
        with structlog.contextvars.bound_contextvars(task=self.job, run_id=self.run_id):
            failure: Failure | None = None
            unreachable = False
            try:
                signals.arm()
                # The engine first (it does not connect): a signal during the start ping is
                # then recorded in the history like any interruption.
                self.target = self.settings.database_target()
                self.engine = db.create_engine(self.target, self.settings.session(), self.job)
                self.pinger.ping("start")  # inside: a signal while it waits is this run's interruption
                work()
                signals.defer()
            except (Exception, Interrupted) as exc:
                signals.defer()
                print_traceback_when_debugging(exc)
                failure = classify(exc, secrets=self.secrets())
                unreachable = is_connection_failure(exc)
            fields = details()
            if failure is not None:
                (self.log.warning if failure.status == RunStatus.SKIPPED else self.log.error)(
                    FAILURE_EVENTS.get(failure.status, "run_failed"),
                    error_class=failure.error_class,
                    error=failure.message,
                    rows=fields.get("rows", 0),
                )
            result = build_result(
                self.job,
                self.run_id,
                started_at=self.started_at - self.host_ahead,
                host_ahead=self.host_ahead,
                clock_started=self.clock_started,
                failure=failure,
                skipped_exit_code=self.settings.skipped_exit_code,
                dry_run=self.dry_run,
                **fields,
            )
            # The run's own connection when it has one; a new one after a failure (none
            # when the database cannot be reached at all).
            self._finish(result, self.conn or (None if unreachable else self.engine))
            self.log.info(
                "run_finished",
                **{
                    key: value
                    for key, value in result.as_dict().items()
                    if key not in ("task", "run_id", "error", "error_class")
                },
            )
        return result

    def close_connection(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _finish(self, result: RunResult, bind: sa.Connection | sa.Engine | None) -> None:
        """The history row, the connections released, then the end ping. A stop signal
        from here on is only noted (signals.defer): the record is written whole and keeps
        the run's outcome, the caller stops after it (result.signal), and only the slow
        step, the end ping, is skipped."""
        try:
            if self.target is not None:
                bind = None if self.history_refused else bind
                history.record_run(bind, self.settings, result, self.target.identity, self.snapshot)
        finally:
            self.close_connection()
            if self.engine is not None:
                self.engine.dispose()
        result.signal = signals.pending()
        if result.signal is not None:
            return
        try:
            signals.arm()  # the end ping is the one step a stop signal may cut short
            self.pinger.ping(str(result.exit_code), body=ping_body(result))
        except Interrupted as exc:
            result.signal = exc.signum
        finally:
            signals.defer()


def ping_body(result: RunResult) -> str:
    body = f"task={result.task} status={result.status} rows={result.rows} duration_ms={result.duration_ms}"
    return body + (f" error={result.error}" if result.error else "")
