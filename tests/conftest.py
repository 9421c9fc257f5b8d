"""Real databases for every test: a fresh PostgreSQL database or SQLite file each.

PostgreSQL comes from SKYBOT_TEST_DATABASE_URL, else from testcontainers
(postgres:16) when Docker is reachable, else the PostgreSQL tests skip; with CI
set they fail instead, so a CI without a database cannot pass by skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from skybot_cleanup.schema import app_metadata

TEST_URL_ENV = "SKYBOT_TEST_DATABASE_URL"
CONSOLE_SCRIPT = Path(sys.executable).with_name("skybot-cleanup")
# Fixed "now" for exact-boundary tests: millisecond precision like Prisma's columns.
NOW = datetime(2026, 11, 28, 12, 0, 0, 500_000)


def _sqlalchemy_url(url: str) -> sa.URL:
    parsed = sa.make_url(url)
    return parsed.set(drivername="postgresql+psycopg")


@pytest.fixture(scope="session")
def pg_server() -> sa.URL:
    """URL of a PostgreSQL server where the tests may create and drop databases."""
    url = os.environ.get(TEST_URL_ENV)
    if url:
        yield _sqlalchemy_url(url)
        return
    try:
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16", driver="psycopg")
        container.start()
    except Exception as exc:  # no Docker engine, no image, no testcontainers
        reason = f"no PostgreSQL for tests: set {TEST_URL_ENV} or make Docker reachable ({type(exc).__name__})"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    try:
        yield _sqlalchemy_url(container.get_connection_url())
    finally:
        container.stop()


@pytest.fixture(scope="session")
def pg_admin(pg_server):
    engine = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def pg_template(pg_admin, pg_server) -> str:
    """A database with the app's tables, copied for each test (faster than DDL each time)."""
    name = f"skybot_tpl_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(pg_server.set(database=name), poolclass=sa.pool.NullPool)
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

    def __post_init__(self):
        self.tables = app_metadata().tables

    def insert(self, table: str, rows: list[dict]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.tables[table].insert(), rows)

    def ids(self, table: str) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.scalars(sa.select(self.tables[table].c.id)))

    def execute(self, sql: str) -> None:
        with self.engine.begin() as conn:
            conn.exec_driver_sql(sql)


@pytest.fixture
def pg_database(pg_admin, pg_server, pg_template) -> sa.URL:
    """A fresh database, cloned from the template, dropped after the test.

    Per-test databases rather than rollback: the tool commits its own transactions.
    """
    name = f"skybot_test_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield pg_server.set(database=name)
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres(pg_database) -> Backend:
    engine = sa.create_engine(pg_database, poolclass=sa.pool.NullPool)
    # The tool gets the URL as Render hands it out, not in SQLAlchemy's dialect form.
    tool_url = pg_database.set(drivername="postgresql").render_as_string(hide_password=False)
    yield Backend("postgres", tool_url, engine)
    engine.dispose()


@pytest.fixture
def sqlite(tmp_path) -> Backend:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    app_metadata().create_all(engine)
    yield Backend("sqlite", url, engine)
    engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request) -> Backend:
    return request.getfixturevalue(request.param)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No test sees the developer's DATABASE_URL, settings or .env file."""
    for name in list(os.environ):
        if name.startswith("SKYBOT_CLEANUP_") or name in ("DATABASE_URL", "PGTZ"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console script, run the way cron runs it: a bare environment."""
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} missing: pip install -e '.[test]'"
    base = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run([str(CONSOLE_SCRIPT), *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)

