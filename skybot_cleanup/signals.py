"""Stop signals (SIGTERM from Render, systemd and Kubernetes; SIGINT at a terminal).

While a run does its work, a stop signal raises Interrupted: psycopg cancels the running
statement, the open transaction rolls back, the batches already committed stay. Once the
work is over, a signal is only noted: the run's record (history row, spool entry,
textfile, log line) is written whole, the process exits with the code that record holds
(cron and the history never disagree), and the command runs no further task.
"""

from __future__ import annotations

import signal

from skybot_cleanup.errors import Interrupted

_raising = True
_pending: int | None = None


def install() -> None:
    """SIGTERM and SIGINT end the work cleanly (the command line installs this)."""
    reset()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handle)


def reset() -> None:
    """Forget any noted signal (a new command in the same process: the tests' runner)."""
    global _raising, _pending
    _raising, _pending = True, None


def _handle(signum: int, _frame: object) -> None:
    global _pending
    _pending = _pending or signum
    if _raising:
        raise Interrupted(signum)


def arm() -> None:
    """A run's work begins: from here a stop signal interrupts it (one noted since the
    last run's work ended interrupts it at once)."""
    global _raising
    if _pending is not None:
        raise Interrupted(_pending)
    _raising = True


def defer() -> None:
    """A run's work is over: a stop signal from here on is noted, not raised."""
    global _raising
    _raising = False


def pending() -> int | None:
    """The stop signal noted since the work ended, if any."""
    return _pending
