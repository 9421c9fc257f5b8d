"""What the tests share besides fixtures: running the tool, reading its output, seeding the
app's tables, and watching the server. Test modules import from here, never from each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.cli import app
from skybot_cleanup.clock import iso_utc, utc_now
from skybot_cleanup.demo import idempotency_key_row, insert_rows, magic_link_row, refresh_token_row
from skybot_cleanup.history import ensure_tables, history_row, history_tables
from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.results import RunResult

REPOSITORY = Path(__file__).resolve().parents[1]
DEPLOY = REPOSITORY / "deploy"
CONSOLE_SCRIPT = Path(sys.executable).with_name("skybot-cleanup")
# Fixed "now" for exact-boundary tests: millisecond precision like Prisma's columns.
NOW = datetime(2026, 11, 28, 12, 0, 0, 500_000)
IN_CI = bool(os.environ.get("CI"))
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
TASK_NAMES = [task.name for task in REGISTRY.tasks]
JOB_NAMES = [job.name for job in REGISTRY.jobs]
# A password the tests give the tool, to prove it never shows it.
PASSWORD = "hunter2-Secret"
SECRET = "s3cr3t-Pa55"
# A moment of no significance to any schedule, for run-time comparisons.
BASE = datetime(2026, 11, 28, 22, 31, tzinfo=UTC)
# Tests that run the tool as another OS user share one xdist worker.
os_user_group = pytest.mark.xdist_group("os-user")
# The application_name a refresh-tokens run shows in pg_stat_activity.
APP_NAME = "skybot-cleanup:refresh-tokens"


def need(tool: str) -> str:
    """The path of an installed program, or skip (fail under CI)."""
    import shutil

    path = shutil.which(tool)
    if path is None:
        package = "prometheus" if tool == "promtool" else tool
        unavailable(f"{tool} is not installed (Debian: apt-get install {package})")
    return str(path)


def unavailable(reason: str) -> None:
    """Skip, or fail under CI: a missing component must not pass for a green run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: a missing component fails the run)", pytrace=False)
    pytest.skip(reason)


@dataclass
class Backend:
    """A throwaway database with the app's tables, and the URL the tool is given."""

    kind: str
    url: str
    engine: sa.Engine

    metadata: sa.MetaData = field(default_factory=app_metadata)

    def __post_init__(self) -> None:
        self.tables = self.metadata.tables

    def insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            insert_rows(conn, self.metadata, {table: rows})

    def ids(self, table: str) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.scalars(sa.select(self.tables[table].c.id)))

    def execute(self, sql: str) -> None:
        with self.engine.begin() as conn:
            conn.exec_driver_sql(sql)

    @property
    def database(self) -> str:
        return str(self.engine.url.database)


# -- URLs ---------------------------------------------------------------------------------------


def with_query(url: str, **parameters: str) -> str:
    """The URL with query parameters merged in (a socket URL already has ?host=)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True)) | parameters
    return urlunsplit(parts._replace(query=urlencode(query)))


def sqlalchemy_url(url: str) -> sa.URL:
    return sa.make_url(url).set(drivername="postgresql+psycopg")


def database_url(server_url: str, database: str) -> str:
    """The same server, another database, in the form Render hands out."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(scheme="postgresql", path=f"/{database}"))


def unreachable_twin(url: str) -> str:
    """The same user and database name (so the same history identity), on a server that is down."""
    parsed = sa.make_url(url)
    if "host" in parsed.query:  # a unix-socket URL
        parsed = parsed.update_query_dict({"host": "/nonexistent-skybot-socket"})
    else:
        parsed = parsed.set(host="127.0.0.1", port=1)
    return parsed.render_as_string(hide_password=False)


def shown(backend: Any, table: str) -> str:
    """A table as the tool names it in messages: schema-qualified on PostgreSQL (Prisma's public)."""
    return f'"public"."{table}"' if backend.kind == "postgres" else f'"{table}"'


def as_role(url: str, role: str) -> str:
    return sa.make_url(url).set(username=role).render_as_string(hide_password=False)


# -- running the tool ---------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    """The CLI in process (typer's runner): stdout and stderr apart."""
    return CliRunner().invoke(app, list(args), env=env)


def _bare_environment() -> dict[str, str]:
    # Never the real ~/.local/state: each test has its own XDG_STATE_HOME.
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "XDG_STATE_HOME": os.environ.get("XDG_STATE_HOME", ""),
    }


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
    user: str | None = None,
    via: Sequence[str] = (),
    umask: int | None = None,
    file_size_limit: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """The installed console script, run the way cron runs it: a bare environment (under
    `via`, a command that runs it, such as faketime; as `user`, through setpriv; with a
    `umask`; with a `file_size_limit` in bytes, as a full disk would fail its writes)."""
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} missing: pip install -e '.[test]'"
    command = [*via, str(CONSOLE_SCRIPT), *args]
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "--", *command]

    def limits() -> None:
        if umask is not None:
            os.umask(umask)
        if file_size_limit is not None:
            import resource
            import signal

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        command,
        env={**_bare_environment(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        preexec_fn=limits,
    )


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """The console script in the background."""
    return subprocess.Popen(
        [str(CONSOLE_SCRIPT), *args],
        env={**_bare_environment(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def least_privilege_grants(role: str) -> list[str]:
    """What a DBA grants the cleanup role (the least `check` asks for): the app's tables,
    and a schema of its own for its run history."""
    return [
        f'GRANT SELECT, DELETE ON "IdempotencyKey", "RefreshToken", "MagicLink" TO "{role}"',
        f'CREATE SCHEMA skybot_cleanup AUTHORIZATION "{role}"',
    ]


def with_password(url: str, password: str) -> str:
    """`url` with `password` put in as given (unencoded, if the test wants that): the
    test servers trust local connections, so it is carried but never checked."""
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:{password}@{host}"))


def env_for(backend: Any, **settings: object) -> dict[str, str]:
    """DATABASE_URL, quick retries, and SKYBOT_CLEANUP_<NAME> for each setting given."""
    env = {"DATABASE_URL": backend.url, "SKYBOT_CLEANUP_RETRY_DELAY_MS": "50"}
    env.update({f"SKYBOT_CLEANUP_{name.upper()}": str(value) for name, value in settings.items()})
    return env


# -- reading its output -------------------------------------------------------------------------


def events(stderr: str, name: str | None = None) -> list[dict[str, Any]]:
    """The JSON log events on stderr (only those called `name`, if given)."""
    found = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [event for event in found if name is None or event["event"] == name]


def event_names(stderr: str) -> list[str]:
    return [event["event"] for event in events(stderr)]


def error_line(stderr: str) -> str:
    """The one line a failure ends with: its message, in JSON or plain form."""
    last = stderr.splitlines()[-1]
    if last.startswith("{"):
        event = json.loads(last)
        assert event["level"] == "error"
        return str(event["error"])
    assert last.startswith("skybot-cleanup: "), last
    return last.removeprefix("skybot-cleanup: ").removeprefix("error: ")


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def check_findings(result: Any) -> list[tuple[str, str]]:
    """(level, message) of each finding of `check --json`."""
    return [(f["level"], f["message"]) for f in json_lines(result.stdout)]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A textfile's samples by (name, labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def prom_values(path: Path) -> dict[str, float]:
    return {name: value for (name, _labels), value in samples(path.read_text()).items()}


def last_success(path: Path) -> float | None:
    return prom_values(path).get("skybot_cleanup_last_success_timestamp_seconds")


# -- seeding the app's tables -------------------------------------------------------------------


def seed_due_and_live(backend: Any, due: int, live: int = 5) -> tuple[set[str], set[str]]:
    """Refresh tokens: `due` expired ones (a second apart, oldest last) and `live` ones."""
    now = utc_now()
    due_rows = [refresh_token_row(f"due_{i:04d}", now - HOUR - i * timedelta(seconds=1)) for i in range(due)]
    live_rows = [refresh_token_row(f"live_{i:04d}", now + HOUR) for i in range(live)]
    backend.insert("RefreshToken", due_rows + live_rows)
    return {r["id"] for r in due_rows}, {r["id"] for r in live_rows}


def seed_tokens(backend: Any, now: datetime | None = None) -> None:
    """Two expired refresh tokens, one live, one revoked (kept for audit)."""
    now = now or utc_now()
    backend.insert(
        "RefreshToken",
        [
            refresh_token_row("expired_1", now - HOUR),
            refresh_token_row("expired_2", now - 5 * HOUR),
            refresh_token_row("live", now + HOUR),
            refresh_token_row("revoked_expired", now - HOUR, revoked=now - 2 * HOUR),
        ],
    )


def seed_tokens_and_keys(backend: Any, due: int = 12) -> None:
    """`due` expired refresh tokens and idempotency keys, and one live of each."""
    now = utc_now()
    backend.insert(
        "RefreshToken",
        [refresh_token_row(f"due_{i:03d}", now - HOUR - i * timedelta(seconds=1)) for i in range(due)]
        + [refresh_token_row("live", now + HOUR)],
    )
    backend.insert(
        "IdempotencyKey",
        [idempotency_key_row(f"ik_{i:03d}", now - HOUR - i * timedelta(seconds=1)) for i in range(due)]
        + [idempotency_key_row("ik_live", now + HOUR)],
    )


def seed_operator_data(backend: Any) -> None:
    """A little of everything the metrics job measures."""
    now = utc_now()
    backend.insert(
        "RefreshToken",
        [
            refresh_token_row("live_1", now + DAY),
            refresh_token_row("live_2", now + HOUR),
            refresh_token_row("revoked_live", now + DAY, revoked=now - HOUR),
            refresh_token_row("expired_3h", now - 3 * HOUR),
            refresh_token_row("expired_1h", now - HOUR),
            refresh_token_row("revoked_100d", now - 50 * DAY, revoked=now - 100 * DAY),
        ],
    )
    backend.insert(
        "MagicLink",
        [
            magic_link_row("ml_live", now + 10 * MINUTE),
            magic_link_row("ml_used", now + 10 * MINUTE, used=True),
            magic_link_row("ml_expired", now - 2 * HOUR),
        ],
    )
    in_progress_new = {**idempotency_key_row("ik_running", now + DAY, status=None), "createdAt": now - MINUTE}
    in_progress_old = {**idempotency_key_row("ik_stuck", now + DAY, status=None), "createdAt": now - HOUR}
    backend.insert(
        "IdempotencyKey",
        [
            in_progress_new,
            in_progress_old,
            idempotency_key_row("ik_done", now + DAY),
            idempotency_key_row("ik_expired", now - 4 * HOUR),
        ],
    )
    if backend.kind == "postgres":
        backend.execute("ANALYZE")


# -- the history --------------------------------------------------------------------------------


def history_rows(backend: Any) -> list[dict[str, Any]]:
    runs = history_tables(backend.engine.dialect.name, "skybot_cleanup").runs
    with backend.engine.connect() as conn:
        return [dict(row) for row in conn.execute(sa.select(runs).order_by(runs.c.id)).mappings()]


def put_history(
    backend: Any, *runs: tuple[str, str, timedelta], first_seen: timedelta = 10 * DAY, error: str = "connection refused"
) -> None:
    """Recorded runs (task, status, how long ago), as the tool records them; a failed
    one with `error`."""
    tables = history_tables(backend.engine.dialect.name, "skybot_cleanup")
    now = utc_now()
    rows = []
    for task, status, ago in runs:
        result = RunResult(
            task=task,
            status=status,
            dry_run=False,
            rows=7,
            cutoff=iso_utc(now - ago) or "",
            duration_ms=10,
            run_id=str(uuid.uuid4()),
            exit_code=0 if status == "ok" else 1,
            finished_at=iso_utc(now - ago),
            error_class=None if status == "ok" else "OperationalError",
            error=None if status == "ok" else error,
        )
        rows.append(history_row(result, host="test"))
    with backend.engine.begin() as conn:
        ensure_tables(conn, tables, "skybot_cleanup")
        conn.execute(tables.meta.update().values(value=(now - first_seen).isoformat() + "Z"))
        if rows:
            conn.execute(tables.runs.insert(), rows)
        conn.execute(tables.snapshots.insert(), {"taken_at": now - 2 * MINUTE, "host": "test", "snapshot": "{}"})


# A batch as slow as a bad day: every row deleted waits a second (qualified: the tool's
# transactions pin search_path to pg_catalog).
SLOW_DELETES = """
CREATE FUNCTION public.slow_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.pg_sleep(1); RETURN OLD; END $$;
CREATE TRIGGER slow_delete BEFORE DELETE ON public."RefreshToken" FOR EACH ROW EXECUTE FUNCTION public.slow_delete();
"""


# A DELETE that waits, row by row, until the test opens the gate: whatever the machine's
# speed, the statement is still running while the test does what it must meanwhile. It
# polls (no lock wait), so the tool's lock_timeout does not end it.
DELETE_GATE_KEY = 4242
GATED_DELETES = f"""
CREATE FUNCTION public.gated_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  WHILE NOT pg_catalog.pg_try_advisory_lock({DELETE_GATE_KEY}) LOOP PERFORM pg_catalog.pg_sleep(0.05); END LOOP;
  PERFORM pg_catalog.pg_advisory_unlock({DELETE_GATE_KEY});
  RETURN OLD;
END $$;
CREATE TRIGGER gated_delete BEFORE DELETE ON public."RefreshToken" FOR EACH ROW EXECUTE FUNCTION public.gated_delete();
"""


@contextmanager
def closed_delete_gate(backend: Any) -> Iterator[None]:
    """GATED_DELETES wait while this is open; they go on once it ends."""
    with backend.engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_catalog.pg_advisory_lock({DELETE_GATE_KEY})")
        try:
            yield
        finally:
            conn.exec_driver_sql(f"SELECT pg_catalog.pg_advisory_unlock({DELETE_GATE_KEY})")


def statement_running(backend: Any, application: str = APP_NAME) -> bool:
    """A session of the tool is in the middle of a DELETE (a batch's DELETE is in a CTE
    whose text may go past what pg_stat_activity keeps)."""
    return bool(
        scalar(
            backend,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app AND state = 'active'"
            " AND (query ILIKE '%DELETE FROM%' OR query LIKE 'WITH picked AS%') AND datname = current_database()",
            app=application,
        )
    )


# -- watching the server ------------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> None:
    """Poll for a state the test needs (never a bound on how fast the tool is)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def remaining_ids(backend: Any) -> set[str]:
    return backend.ids("RefreshToken")


def scalar(backend: Any, sql: str, **params: object) -> Any:
    with backend.engine.connect() as conn:
        return conn.scalar(sa.text(sql), params)


def advisory_lock_sql(task: str) -> str:
    return f"SELECT pg_advisory_xact_lock(hashtextextended('skybot-cleanup:{task}', 0))"


def advisory_lock_held(backend: Any) -> bool:
    return bool(
        scalar(
            backend,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
    )


def our_backends(backend: Any, application: str = APP_NAME) -> int:
    return int(
        scalar(
            backend,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app AND datname = current_database()",
            app=application,
        )
    )


def backend_waiting(backend: Any, application: str = APP_NAME) -> bool:
    """A session of the tool waits for a lock (a row the app holds, or a table)."""
    return bool(
        scalar(
            backend,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app"
            " AND wait_event_type = 'Lock' AND datname = current_database()",
            app=application,
        )
    )


# -- other releases ------------------------------------------------------------------------------

# The release before this one (0.1.0). Its spool entries are 0644 files in a 0755
# directory, with exactly the twelve fields it knew; it sets aside any other entry.
PREVIOUS_RELEASE = "34a245a"


def run_release(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Another release's console script, as cron runs it (umask 022, a bare environment)."""
    return subprocess.run(
        [str(script), *args],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root"), **env},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(0o022),
    )


def outage(url: str, state: Path) -> dict[str, str]:
    """The settings of a run for `url`'s user and database while its server is down: its
    record waits in the spool under `state`."""
    return {
        "DATABASE_URL": unreachable_twin(url),
        "SKYBOT_CLEANUP_STATE_DIR": str(state),
        "SKYBOT_CLEANUP_MAX_RETRIES": "0",
    }
