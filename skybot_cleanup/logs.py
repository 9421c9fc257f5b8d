"""structlog on stderr: JSON for machines, key=value for people at a terminal.

In JSON mode nothing else reaches stderr: the one line a failure ends with is a
JSON event too, so a syslog or log pipeline gets one parseable record per event.

Under systemd (stderr is the journal) or behind `logger --prio-prefix` (the generated
crontab), each line starts with its syslog priority, `<3>` for an error: journald and
logger file the line at that priority and strip the prefix, so an error reaches syslog
as `err` and the journal as priority 3, not as everything else's notice or info. Without
the prefix (a terminal, a pipe, a script), every JSON line is JSON and nothing else.
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
_prefixed: bool | None = None
# syslog's priorities (RFC 5424) for structlog's method names.
PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


class _CurrentStderr:
    """Whatever sys.stderr is at write time (test runners swap it per call)."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(log_format: str = "auto", level: str = "info", syslog_prefix: str = "auto") -> None:
    global _as_json, _prefixed
    _as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    _prefixed = syslog_prefix == "on" or (syslog_prefix == "auto" and stderr_is_journal())
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
            *([_with_priority] if _prefixed else []),
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


def _with_priority(_logger: Any, method: str, line: Any) -> str:
    """The rendered line (the renderer comes first) behind its syslog priority: `<3>{"event": ...}`."""
    return f"<{PRIORITIES.get(method, PRIORITIES['info'])}>{line}"


def stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal: JOURNAL_STREAM names the journal stream's
    device and inode, and stderr is still that stream unless someone redirected it."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # no stderr, or one without a descriptor
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def reset() -> None:
    """Forget the configured format (each CLI invocation configures its own)."""
    global _as_json, _prefixed
    _as_json = None
    _prefixed = None


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


def _asked_prefix() -> str:
    """SKYBOT_CLEANUP_SYSLOG_PREFIX before the settings load (or when they fail): the
    crontab sets it in the environment, so a bad setting's line still gets its priority."""
    return os.environ.get("SKYBOT_CLEANUP_SYSLOG_PREFIX", "auto").lower()


def lines_are_prefixed() -> bool:
    """The configured choice; before the settings load, what the environment asks for."""
    if _prefixed is not None:
        return _prefixed
    asked = _asked_prefix()
    return asked == "on" or (asked == "auto" and stderr_is_journal())


def get_logger() -> Any:
    return structlog.get_logger("skybot_cleanup")


def report_failure(message: str, *, logged: bool = False, **fields: Any) -> None:
    """The one line a failed command ends with: `skybot-cleanup: <message>` for a person,
    an `error` event in JSON mode (skipped when the failure was logged already)."""
    message = redact(message)
    if not logs_are_json():
        prefix = f"<{PRIORITIES['error']}>" if lines_are_prefixed() else ""
        print(f"{prefix}skybot-cleanup: {message}", file=sys.stderr)
    elif not logged:
        if _as_json is None:
            configure_logging("json", syslog_prefix=_asked_prefix())
        get_logger().error("error", error=message.removeprefix("error: "), **fields)
