"""The tool's closed vocabularies, one enum each: what a run ended as, how a job is doing,
how serious a finding is, why a run stopped early. Their values are what the history,
the JSON output, the textfiles and the docs spell (StrEnum: each value is its string)."""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class RunStatus(StrEnum):
    """How a run ended (history, JSON, textfiles, heartbeat)."""

    OK = "ok"
    SKIPPED = "skipped"  # another run held the task's lock
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # a stop signal


# What a scheduled run can end as, skips aside: what a job's health is judged by.
REAL_STATUSES = (RunStatus.OK, RunStatus.FAILED, RunStatus.INTERRUPTED)


@unique
class Health(StrEnum):
    """A job's health, as `status` shows it."""

    OK = "OK"  # a success within two intervals of its schedule
    PENDING = "PENDING"  # never run, and its first scheduled run (plus grace) is still to come
    OVERDUE = "OVERDUE"  # no success for longer than that
    FAILING = "FAILING"  # its newest run failed, or its next one cannot succeed (a table, a privilege)
    UNKNOWN = "UNKNOWN"  # cannot be judged: no history, or a backlog nobody may count

    @property
    def healthy(self) -> bool:
        return self in (Health.OK, Health.PENDING)


@unique
class Level(StrEnum):
    """How serious a finding of `check` is."""

    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@unique
class StopReason(StrEnum):
    """Why a run ended before its walk did (its result's stopped_by)."""

    MAX_ROWS = "max_rows"
    MAX_RUNTIME = "max_runtime"
    REPLICA_LAG = "replica_lag"  # a standby stopped replaying while behind the lag target
