"""The one place where failures become statuses, exit codes and one-line messages."""

from __future__ import annotations

import re
from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_SKIPPED = 75  # EX_TEMPFAIL: schedulers treat it as "try again later"


class CleanupError(Exception):
    """An expected failure: reported as one line, never with a traceback."""

    exit_code = EXIT_FAILURE
    status = "failed"


class ConfigError(CleanupError):
    exit_code = EXIT_CONFIG


class LockHeld(CleanupError):
    exit_code = EXIT_SKIPPED
    status = "skipped"


class Interrupted(KeyboardInterrupt):
    """Raised from the SIGTERM/SIGINT handler.

    A KeyboardInterrupt subclass because psycopg cancels the running query on the
    server when one arrives mid-statement, so nothing half-done is committed.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass(frozen=True)
class Failure:
    status: str
    exit_code: int
    error_class: str
    message: str


# SQLSTATE classes that mean the configuration does not match the database,
# which retrying cannot fix: undefined table/column/schema, privileges.
_CONFIG_SQLSTATES = {"42P01", "42703", "3F000", "42501", "28P01", "28000", "3D000"}
_SQLITE_CONFIG_MESSAGES = ("no such table", "no such column", "unable to open database")


def classify(exc: BaseException, secrets: tuple[str, ...] = ()) -> Failure:
    """Map any exception of a run to what the user sees and the process returns."""
    if isinstance(exc, Interrupted):
        return Failure("interrupted", exc.exit_code, "Interrupted", f"interrupted by signal {exc.signum}")
    if isinstance(exc, CleanupError):
        return Failure(exc.status, exc.exit_code, type(exc).__name__, redact(str(exc), secrets))

    original = getattr(exc, "orig", None) or exc
    error_class = type(original).__name__
    message = redact(_first_line(original), secrets)
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate in _CONFIG_SQLSTATES or (
        type(original).__module__ == "sqlite3" and message.lower().startswith(_SQLITE_CONFIG_MESSAGES)
    ):
        return Failure("failed", EXIT_CONFIG, error_class, message)
    return Failure("failed", EXIT_FAILURE, error_class, message)


# Worth retrying: serialization failure, deadlock, lock timeout, server shutting
# down or restarting, a terminated backend, too many connections, and class 08
# (connection exceptions). A statement timeout (57014) is not: it would recur.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"}


def is_transient(exc: BaseException) -> bool:
    original = getattr(exc, "orig", None) or exc
    if type(original).__module__.split(".")[0] != "psycopg":
        return False
    sqlstate = getattr(original, "sqlstate", None)
    if sqlstate:
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")
    # No SQLSTATE: the connection itself failed (refused, reset, closed by the server).
    import psycopg

    return isinstance(original, psycopg.OperationalError)


def is_connection_failure(exc: BaseException) -> bool:
    """The database could not be reached (or went away): nothing more can be written there."""
    if not is_transient(exc):
        return False
    sqlstate = getattr(getattr(exc, "orig", None) or exc, "sqlstate", None) or ""
    return not sqlstate or sqlstate.startswith(("08", "57P"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove passwords, whether they came in a URL or anywhere else in a message."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def worst_exit_code(codes) -> int:
    """The exit code of several runs: configuration errors first, then failures,
    interruptions, skips; 0 only when every run succeeded."""
    codes = list(codes)
    for wanted in (EXIT_CONFIG, EXIT_FAILURE):
        if wanted in codes:
            return wanted
    interrupted = [code for code in codes if code > 128]
    if interrupted:
        return interrupted[0]
    return EXIT_SKIPPED if EXIT_SKIPPED in codes else EXIT_OK
