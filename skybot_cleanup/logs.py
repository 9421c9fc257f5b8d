"""structlog on stderr: JSON for machines, key=value for people at a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


class _CurrentStderr:
    """Whatever sys.stderr is at write time (test runners swap it per call)."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # stdout belongs to --json results; logs never mix into it.
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        # Not cached, so a reconfiguration (tests, a second CLI call) takes effect.
        cache_logger_on_first_use=False,
    )


def get_logger():
    return structlog.get_logger("skybot_cleanup")
