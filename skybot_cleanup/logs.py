"""structlog on stderr: JSON for machines, key=value for people at a terminal.

In JSON mode nothing else reaches stderr: the one line a failure ends with is a
JSON event too, so a syslog or log pipeline gets one parseable record per event.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO, cast

import structlog

from skybot_cleanup.errors import redact

_as_json: bool | None = None


class _CurrentStderr:
    """Whatever sys.stderr is at write time (test runners swap it per call)."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    global _as_json
    _as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if _as_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _redacted,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # stdout belongs to results (--json); logs never mix into it.
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        # Not cached, so a reconfiguration (tests, a second CLI call) takes effect.
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers = [_LibraryRecords()]
    root.setLevel(logging.WARNING)


def _redacted(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """Every string of every event, whoever logs it: no secret, no control character."""
    return {key: redact(value) if isinstance(value, str) else value for key, value in event.items()}


def reset() -> None:
    """Forget the configured format (each CLI invocation configures its own)."""
    global _as_json
    _as_json = None


class _LibraryRecords(logging.Handler):
    """Warnings and errors of the libraries (SQLAlchemy's pool, say) as one event each,
    the exception summed up in one line: never a multi-line traceback in the stream."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        (get_logger().error if record.levelno >= logging.ERROR else get_logger().warning)("library_log", **fields)


def logs_are_json() -> bool:
    """The configured format; before the settings load (or when they fail), what the
    environment asks for."""
    if _as_json is not None:
        return _as_json
    asked = os.environ.get("SKYBOT_CLEANUP_LOG_FORMAT", "auto").lower()
    return asked == "json" or (asked != "console" and not sys.stderr.isatty())


def get_logger() -> Any:
    return structlog.get_logger("skybot_cleanup")


def report_failure(message: str, *, logged: bool = False, **fields: Any) -> None:
    """The one line a failed command ends with: `skybot-cleanup: <message>` for a person,
    an `error` event in JSON mode (skipped when the failure was logged already)."""
    message = redact(message)
    if not logs_are_json():
        print(f"skybot-cleanup: {message}", file=sys.stderr)
    elif not logged:
        if _as_json is None:
            configure_logging("json")
        get_logger().error("error", error=message.removeprefix("error: "), **fields)
