"""The one place where failures become statuses, exit codes, retry decisions and
one-line messages."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, unique

from skybot_cleanup.vocabulary import RunStatus


@unique
class ExitCode(IntEnum):
    """Every exit code the tool chooses, by name (pipx's constants.py is the model).

    The help text, the README's table, the alert rules and their tests, and the deploy
    files (systemd, Kubernetes, cron) are generated from this class: change a code here
    and regenerate; nothing else spells one.
    """

    OK = 0
    FAILURE = 1
    CONFIG = 2
    SKIPPED = 75  # EX_TEMPFAIL (sysexits.h): schedulers read it as "try again later"

    # A code shows as its number wherever it is rendered: structlog's key=value output
    # uses repr, and "exit_code=<ExitCode.OK: 0>" would read as noise at 3 AM.
    __repr__ = int.__repr__

    @property
    def summary(self) -> str:
        """A few words, for --help."""
        return _EXIT_CODE_TEXT[self][0]

    @property
    def meaning(self) -> str:
        """Every failure that ends in this code, for the README."""
        return _EXIT_CODE_TEXT[self][1]

    @property
    def retried(self) -> str:
        """Whether a run retries the failures behind this code before exiting with it."""
        return _EXIT_CODE_TEXT[self][2]


_EXIT_CODE_TEXT: dict[ExitCode, tuple[str, str, str]] = {
    ExitCode.OK: (
        "ok (also nothing to delete)",
        'success, including "nothing to delete", dry runs and runs stopped by `--max-rows`/`--max-runtime`',
        "",
    ),
    ExitCode.FAILURE: (
        "failure (after retries)",
        "runtime failure that may pass: database unreachable, refused, reset, timed out, starting up or "
        "shutting down, a lock timeout, deadlock or serialization failure (all after retries), or any "
        "unexpected error; for `status`, a job OVERDUE, FAILING or UNKNOWN; for `check`, an error found; for "
        "`metrics`, a task it could not measure or a snapshot it could not deliver",
        "yes (transient ones)",
    ),
    ExitCode.CONFIG: (
        "usage or configuration error (retrying cannot help)",
        "configuration that retrying cannot fix: usage, an invalid setting or settings file, no or invalid "
        "`DATABASE_URL`, TLS that cannot be verified, authentication failed, role or database missing, no "
        "`pg_hba.conf` entry, a PostgreSQL older than the tool supports, a read-only database or hot "
        "standby, a configured table or column missing, a privilege missing",
        "no",
    ),
    ExitCode.SKIPPED: (
        "skipped (another run holds the task's lock; SKYBOT_CLEANUP_SKIPPED_EXIT_CODE=0 makes it 0)",
        "skipped: another run of the same task holds its lock (schedulers should not alert on it; "
        "`SKYBOT_CLEANUP_SKIPPED_EXIT_CODE=0` maps it to 0 for platforms that count anything else as a failure)",
        "",
    ),
}

# The names the rest of the package imports.
EXIT_OK = ExitCode.OK
EXIT_FAILURE = ExitCode.FAILURE
EXIT_CONFIG = ExitCode.CONFIG
EXIT_SKIPPED = ExitCode.SKIPPED
# Not a code of its own: a process stopped by signal N exits 128 + N, as shells report it.
EXIT_SIGNAL_BASE = 128


def exit_code_for_signal(signum: int) -> int:
    return EXIT_SIGNAL_BASE + signum


def exit_codes_help() -> str:
    """The exit codes in one sentence, for every command's --help."""
    codes = ", ".join(f"{code} {code.summary}" for code in ExitCode)
    return f"Exit codes: {codes}, {EXIT_SIGNAL_BASE}+N stopped by signal N."


class SqlState:
    """The SQLSTATEs the tool acts on by name (the rest are classified by class below)."""

    LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout, or NOWAIT
    QUERY_CANCELED = "57014"  # statement_timeout (or a cancel request)
    UNDEFINED_TABLE = "42P01"
    UNDEFINED_COLUMN = "42703"
    INVALID_SCHEMA_NAME = "3F000"
    INSUFFICIENT_PRIVILEGE = "42501"
    READ_ONLY_SQL_TRANSACTION = "25006"


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, whether SQLAlchemy wrapped it or not."""
    original = getattr(exc, "orig", None) or exc
    return getattr(original, "sqlstate", None)


class CleanupError(Exception):
    """An expected failure: reported as one line, never with a traceback."""

    exit_code = EXIT_FAILURE
    status = RunStatus.FAILED
    transient = False  # worth retrying


class RowsTakenMidStatement(CleanupError):
    """The app took due rows mid-statement again and again: the retry tries later."""

    transient = True


class ConfigError(CleanupError):
    exit_code = EXIT_CONFIG


class LockHeld(CleanupError):
    exit_code = EXIT_SKIPPED
    status = RunStatus.SKIPPED


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
        return exit_code_for_signal(self.signum)


@dataclass(frozen=True)
class Failure:
    status: RunStatus
    exit_code: int
    error_class: str
    message: str
    transient: bool = False  # worth retrying


# SQLSTATEs that mean the configuration does not match the database, which retrying
# cannot fix: undefined table/column/schema, privileges, authentication, unknown
# database, a read-only transaction (a hot standby, or default_transaction_read_only).
_CONFIG_SQLSTATES = {
    SqlState.UNDEFINED_TABLE,
    SqlState.UNDEFINED_COLUMN,
    SqlState.INVALID_SCHEMA_NAME,
    SqlState.INSUFFICIENT_PRIVILEGE,
    "28P01",
    "28000",
    "3D000",
    SqlState.READ_ONLY_SQL_TRANSACTION,
}
# Worth retrying: serialization failure, deadlock, lock timeout, server shutting down
# or restarting, a terminated backend, too many connections, and class 08
# (connection exceptions). A statement timeout (57014) is not: it would recur.
_TRANSIENT_SQLSTATES = {"40001", "40P01", SqlState.LOCK_NOT_AVAILABLE, "57P01", "57P02", "57P03", "53300"}

# psycopg's connection errors carry no SQLSTATE: the server's FATAL text (or libpq's
# own) says what went wrong. These are configuration, each with the fix.
_CONNECTION_CONFIG = [
    (re.compile(p, re.I), hint)
    for p, hint in (
        (
            r"password authentication failed|authentication failed for user|password is required|"
            r"no password supplied",
            "check the user and password of DATABASE_URL",
        ),
        (r'role ".*" does not exist|no such user', "check the user of DATABASE_URL"),
        (r'database ".*" does not exist|no such database', "check the database name of DATABASE_URL"),
        (
            r"no pg_hba\.conf entry|pg_hba\.conf rejects connection",
            "the server's pg_hba.conf does not admit this user, host or TLS mode",
        ),
        (r"permission denied for database", "GRANT CONNECT ON DATABASE to this role"),
        (
            r"certificate verify failed|does not match host name|root certificate file|certificate file|"
            r"private key file|server does not support SSL|SSL is not enabled|SSL connection is required|"
            r"sslmode value|unsupported protocol|tlsv1 alert",
            "check the TLS settings of DATABASE_URL",
        ),
        (
            r"invalid connection option|invalid URI query parameter|invalid integer value|invalid .* value:|"
            r"unrecognized .* parameter",
            "check the parameters of DATABASE_URL",
        ),
    )
]
_SQLITE_CONFIG_MESSAGES = ("no such table", "no such column", "unable to open database")


def classify(exc: BaseException, secrets: Iterable[str] = ()) -> Failure:
    """Map any exception of a run to what the user sees, what the process returns,
    and whether a retry could help."""
    secrets = tuple(secrets)
    if isinstance(exc, Interrupted):
        return Failure(RunStatus.INTERRUPTED, exc.exit_code, "Interrupted", f"interrupted by signal {exc.signum}")
    if isinstance(exc, CleanupError):
        return Failure(exc.status, exc.exit_code, type(exc).__name__, redact(str(exc), secrets), exc.transient)

    original = getattr(exc, "orig", None) or exc
    error_class = type(original).__name__
    full_text = str(original)
    message = redact(_first_line(original), secrets)
    sqlstate = getattr(original, "sqlstate", None)
    driver = type(original).__module__.split(".")[0]

    if sqlstate in _CONFIG_SQLSTATES:
        return Failure(RunStatus.FAILED, EXIT_CONFIG, error_class, message + _SQLSTATE_HINTS.get(sqlstate, ""))
    if driver == "sqlite3" and message.lower().startswith(_SQLITE_CONFIG_MESSAGES):
        return Failure(RunStatus.FAILED, EXIT_CONFIG, error_class, message)
    if sqlstate:
        transient = sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")
        return Failure(RunStatus.FAILED, EXIT_FAILURE, error_class, message, transient=transient)
    if driver == "psycopg" and _is_connection_error(original):
        for pattern, hint in _CONNECTION_CONFIG:
            if pattern.search(full_text):
                return Failure(RunStatus.FAILED, EXIT_CONFIG, error_class, f"{_fatal(full_text, secrets)} ({hint})")
        # Refused, reset, timed out, closed by the server, starting up: may pass.
        return Failure(RunStatus.FAILED, EXIT_FAILURE, error_class, message, transient=True)
    if getattr(exc, "connection_invalidated", False):
        return Failure(RunStatus.FAILED, EXIT_FAILURE, error_class, message, transient=True)
    return Failure(RunStatus.FAILED, EXIT_FAILURE, error_class, message)


def _is_connection_error(exc: BaseException) -> bool:
    """psycopg's OperationalError family (ConnectionTimeout included) and InterfaceError."""
    import psycopg

    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


_SQLSTATE_HINTS = {
    SqlState.READ_ONLY_SQL_TRANSACTION: " (the database is read-only: a hot standby, or "
    "default_transaction_read_only is on; point DATABASE_URL at the primary, or add target_session_attrs=read-write)",
    SqlState.INSUFFICIENT_PRIVILEGE: " (`skybot-cleanup check` prints the GRANT this role needs)",
}


def debugging() -> bool:
    """SKYBOT_CLEANUP_DEBUG, read from the environment alone: it must work when the
    settings themselves are what fails."""
    import os

    return os.environ.get("SKYBOT_CLEANUP_DEBUG", "").lower() in ("1", "true", "yes", "on")


def print_traceback_when_debugging(exc: BaseException) -> None:
    """A failure turned into one line keeps its traceback for whoever asks for it."""
    if debugging():
        import sys
        import traceback

        traceback.print_exception(exc, file=sys.stderr)


def is_transient(exc: BaseException) -> bool:
    return classify(exc).transient


def is_connection_failure(exc: BaseException) -> bool:
    """The database could not be reached, or would not let us in (a refused login, a
    TLS failure): nothing can be written there, so the run's record goes to the spool."""
    original = getattr(exc, "orig", None) or exc
    sqlstate = sqlstate_of(exc)
    if sqlstate:
        return bool(sqlstate.startswith(("08", "57P")))
    return type(original).__module__.split(".")[0] == "psycopg" and _is_connection_error(original)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _fatal(text: str, secrets: tuple[str, ...]) -> str:
    """The server's own reason from a libpq connection error, on one line."""
    match = re.search(r"(?:FATAL|ERROR):\s+(.*)", text)
    reason = match.group(1) if match else _first_line(Exception(text)).removeprefix("connection failed: ")
    return redact(reason.strip(), secrets)


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^\s]*@")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The secrets this process knows (the URL's password, the ping URL...), redacted from
# every message whatever path it takes: an error line, a retry, a history warning, a
# spool entry, a log event.
_known_secrets: set[str] = set()


def reset() -> None:
    """Forget the secrets (a new command in the same process: the tests' runner)."""
    _known_secrets.clear()


def remember_secrets(secrets: Iterable[str]) -> None:
    _known_secrets.update(secret for secret in secrets if secret and len(secret) >= 3)


def escape_control(text: str) -> str:
    """Control characters as \\xNN: text from a database, a spool file or a URL never
    drives the terminal or breaks a line of a log."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def url_key_parts(url: str) -> list[str]:
    """The parts of a URL after its host that may be a key: path, query and fragment
    pieces (hc-ping.com/<uuid>, /<ping-key>/<slug>, ?token=<key>). Short ones ("ping",
    "api") are words, not keys, and would mask ordinary text."""
    after_host = url.partition("://")[2].partition("/")[2]
    return [part for part in re.split(r"[/?&=#]", after_host) if len(part) >= 8]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove passwords, whether they came in a URL or anywhere else in a message, and
    escape control characters."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    for secret in sorted({*secrets, *_known_secrets}, key=len, reverse=True):
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return escape_control(text)


def worst_exit_code(codes: Iterable[int]) -> int:
    """The exit code of several runs: configuration errors first, then failures,
    interruptions, skips; 0 only when every run succeeded."""
    found = list(codes)
    for wanted in (EXIT_CONFIG, EXIT_FAILURE):
        if wanted in found:
            return wanted
    interrupted = [code for code in found if code > EXIT_SIGNAL_BASE]
    if interrupted:
        return interrupted[0]
    return EXIT_SKIPPED if EXIT_SKIPPED in found else EXIT_OK
