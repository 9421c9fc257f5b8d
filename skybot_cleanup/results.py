"""A run's result: the one type every recorded run ends with (a cleanup task, the metrics
job, a command that could not start), and the one way to build it.

Its history row, spool entry, textfile series, heartbeat body, log line and JSON output
are all drawn from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from skybot_cleanup import __version__
from skybot_cleanup.clock import iso_utc, utc_now
from skybot_cleanup.errors import EXIT_OK, EXIT_SKIPPED, Failure
from skybot_cleanup.vocabulary import RunStatus


@dataclass
class RunResult:
    task: str  # the job's name: a cleanup task, or "metrics"
    status: RunStatus
    dry_run: bool
    rows: int
    cutoff: str
    duration_ms: int
    run_id: str
    exit_code: int = EXIT_OK
    started_at: str | None = None
    finished_at: str | None = None
    batches: int | None = None  # batched mode only
    # Due rows left when the run ended: a cap stopped it, or the app held them. Counted;
    # remaining_exact is false when the count itself stopped at a cap (at least this many).
    remaining: int | None = None
    remaining_exact: bool | None = None
    stopped_by: str | None = None  # max_rows | max_runtime | replica_lag, when the run ended before its walk
    longest_batch_ms: int | None = None
    # Seconds the run waited, between batches, for streaming standbys to catch up.
    replica_wait_s: float | None = None
    # How far the host's clock was ahead of the database server's (negative: behind).
    clock_skew_s: float | None = None
    # Connections the run lost and replaced; rows committed on a lost one are unconfirmed:
    # a failover may have lost them, and the walk after the reconnect deletes them again.
    reconnects: int | None = None
    unconfirmed_rows: int | None = None
    warnings: list[str] | None = None  # conditions the run could not fix (row-level security)
    error_class: str | None = None
    error: str | None = None
    signal: int | None = None  # a stop signal that arrived once the run's work was over
    version: str = __version__  # the release that ran it
    # The job's newest success in the history, read as this run was recorded (not a column:
    # what a textfile shows as its last success when this run did not succeed).
    last_success_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def build_result(
    job: str,
    run_id: str,
    *,
    started_at: datetime,
    clock_started: float,
    failure: Failure | None,
    host_ahead: timedelta = timedelta(0),
    skipped_exit_code: int = EXIT_SKIPPED,
    dry_run: bool = False,
    cutoff: datetime | None = None,
    rows: int = 0,
    **details: Any,
) -> RunResult:
    """A finished run's result, its times on the database server's clock (`host_ahead`:
    how far this host's is ahead of it). A skipped run exits with the configured code
    (75, or 0 where the platform counts anything else as a failure)."""
    exit_code = failure.exit_code if failure else EXIT_OK
    if exit_code == EXIT_SKIPPED:
        exit_code = skipped_exit_code
    return RunResult(
        task=job,
        status=failure.status if failure else RunStatus.OK,
        dry_run=dry_run,
        rows=rows,
        cutoff=iso_utc(cutoff or started_at) or "",
        duration_ms=round((time.monotonic() - clock_started) * 1000),
        run_id=run_id,
        exit_code=exit_code,
        started_at=iso_utc(started_at),
        finished_at=iso_utc(utc_now() - host_ahead),
        error_class=failure.error_class if failure else None,
        error=failure.message if failure else None,
        **details,
    )
