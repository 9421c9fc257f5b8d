"""Retrying transient database errors (tenacity), for every command that talks to the database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from skybot_cleanup.errors import classify, is_transient
from skybot_cleanup.settings import Settings

T = TypeVar("T")

# Reporting commands (metrics, status, check) run often and are read by people and
# monitors: they retry less, and sooner.
REPORTING_MAX_RETRIES = 2
REPORTING_MAX_DELAY_MS = 1000


def with_retries(settings: Settings, attempt: Callable[[], T], *, log: Any, reporting: bool = False) -> T:
    """Run `attempt`, retrying transient errors with exponential backoff and jitter.

    The jitter matters: two tasks that start in the same cron minute and fail on the
    same cause must not retry in lockstep. Safe because every attempt is idempotent.
    """
    retries, delay_ms = settings.max_retries, settings.retry_delay_ms
    if reporting:
        retries, delay_ms = min(retries, REPORTING_MAX_RETRIES), min(delay_ms, REPORTING_MAX_DELAY_MS)

    def before_sleep(state: RetryCallState) -> None:
        assert state.outcome is not None and state.next_action is not None
        exc = state.outcome.exception()
        assert exc is not None
        failure = classify(exc)
        log.warning(
            "retrying",
            attempt=state.attempt_number,
            error_class=failure.error_class,
            error=failure.message,
            delay_s=round(state.next_action.sleep, 3),
        )

    retrying = Retrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait_exponential(multiplier=delay_ms / 1000, max=300) + wait_random(0, delay_ms / 1000),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(attempt)
