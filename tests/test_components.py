"""The tool against the components users run it with: PgBouncer in transaction mode,
TLS as Prisma URLs ask for it, a hot standby, password authentication, another OS
user, the systemd unit's sandbox, and node_exporter reading the textfiles."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from components import IS_ROOT, Cluster, scrape_node_exporter, start_cluster, start_pgbouncer, world_dir
from conftest import CONSOLE_SCRIPT, Backend, run_cli, sqlalchemy_url, unavailable

from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import idempotency_key_row, insert_rows, refresh_token_row
from skybot_cleanup.schema import app_metadata

HOUR = timedelta(hours=1)
# What issue #9 asks a settings file to carry through untouched.
PASSWORD = "pa$word${HOME}x&y%z#1"


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def seed(backend, due: int = 12) -> None:
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


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(CONSOLE_SCRIPT), *args],
        env={"PATH": "/usr/bin:/bin", "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"], **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- PgBouncer --------------------------------------------------------------------------------

pgbouncer_group = pytest.mark.xdist_group("pgbouncer")


@pytest.fixture(scope="module", params=[1, 2], ids=lambda size: f"pool{size}")
def pgbouncer(request, pg_server_url):
    bouncer = start_pgbouncer(pg_server_url, pool_size=request.param)
    bouncer.pool_size = request.param
    yield bouncer
    bouncer.stop()


@pgbouncer_group
def test_repeated_batched_runs_leave_no_prepared_statement_on_the_pooled_connection(postgres, pgbouncer):
    """psycopg would prepare after 5 executions; under transaction pooling the next
    client would then fail with "prepared statement _pg3_0 already exists"."""
    for query in ({}, {"pgbouncer": "true"}):
        for _ in range(3):
            seed(postgres, due=8)
            url = pgbouncer.url(postgres.database, **query)
            completed = run_cli("refresh-tokens", "--batch-size", "1", "--json", env={"DATABASE_URL": url})
            assert completed.returncode == 0, completed.stderr
            assert json.loads(completed.stdout)["rows"] == 8
            postgres.execute('DELETE FROM "RefreshToken"; DELETE FROM "IdempotencyKey"')
    engine = sa.create_engine(
        sqlalchemy_url(pgbouncer.url(postgres.database)),
        poolclass=sa.pool.NullPool,
        connect_args={"prepare_threshold": None},
    )
    try:
        with engine.connect() as conn:
            # Through the pool, so on (one of) the very server connections the runs used.
            assert conn.scalar(sa.text("SELECT count(*) FROM pg_prepared_statements")) == 0
    finally:
        engine.dispose()


@pgbouncer_group
def test_two_batched_tasks_started_together_both_finish_through_a_small_pool(postgres, pgbouncer):
    """A run holds one server connection, never two: with a pool of 1 the second task
    queues behind the first; with 2 they run side by side. No deadlock either way."""
    seed(postgres, due=20)
    env = {"DATABASE_URL": pgbouncer.url(postgres.database), "SKYBOT_CLEANUP_RETRY_DELAY_MS": "200"}
    started = time.monotonic()
    runs = [
        start_cli(task, "--batch-size", "2", "--sleep-ms", "20", "--json", env=env)
        for task in ("idempotency-keys", "refresh-tokens")
    ]
    results = [run.communicate(timeout=60) for run in runs]
    for run, (out, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err
        assert json.loads(out)["rows"] == 20
    assert time.monotonic() - started < 25
    assert postgres.ids("RefreshToken") == {"live"} and postgres.ids("IdempotencyKey") == {"ik_live"}


@pgbouncer_group
def test_a_row_the_app_holds_is_stepped_around_through_pgbouncer(postgres, pgbouncer):
    seed(postgres, due=15)
    with postgres.engine.connect() as app_conn:  # the app, directly
        app_conn.exec_driver_sql("""SELECT 1 FROM "RefreshToken" WHERE id = 'due_007' FOR UPDATE""")
        completed = run_cli(
            "refresh-tokens",
            "--batch-size",
            "4",
            "--json",
            env={"DATABASE_URL": pgbouncer.url(postgres.database), "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "200"},
        )
        app_conn.rollback()
    result = json.loads(completed.stdout)
    assert (completed.returncode, result["rows"], result["remaining"]) == (0, 14, 1), completed.stderr
    assert postgres.ids("RefreshToken") == {"live", "due_007"}


# -- TLS, password authentication and a hot standby ------------------------------------------

tls_group = pytest.mark.xdist_group("tls")
ROLE = "skybot_app"


@pytest.fixture(scope="module")
def clusters() -> tuple[Cluster, Cluster]:
    if not IS_ROOT and os.environ.get("USER") != "postgres":
        unavailable("the TLS cluster is started as the postgres user: run the tests as root")
    generator = start_cluster(ROLE, PASSWORD)
    primary, standby = next(generator)
    engine = sa.create_engine(
        f"postgresql+psycopg://postgres@/postgres?host={primary.socket_dir}&port={primary.port}",
        poolclass=sa.pool.NullPool,
    )
    metadata = app_metadata()
    metadata.create_all(engine)
    now = utc_now()
    with engine.begin() as conn:
        insert_rows(conn, metadata, {"RefreshToken": [refresh_token_row(f"due_{i}", now - HOUR) for i in range(5)]})
        conn.exec_driver_sql(f'GRANT SELECT, DELETE ON "IdempotencyKey", "RefreshToken", "MagicLink" TO {ROLE}')
        conn.exec_driver_sql(f"CREATE SCHEMA skybot_cleanup AUTHORIZATION {ROLE}")
    engine.dispose()
    primary.psql("SELECT pg_switch_wal()")
    yield primary, standby
    with contextlib.suppress(StopIteration):
        next(generator)


def tls_url(cluster: Cluster, host: str = "localhost", password: str = PASSWORD, **query: str) -> str:
    extra = "&".join(f"{key}={value}" for key, value in query.items())
    return f"postgresql://{ROLE}:{quote(password, safe='')}@{host}:{cluster.port}/postgres" + (
        f"?{extra}" if extra else ""
    )


@tls_group
def test_strict_tls_with_the_ca_connects_and_cleans(clusters):
    primary, _standby = clusters
    url = tls_url(primary, sslmode="require", sslaccept="strict", sslcert=str(primary.ca))
    completed = run_cli("refresh-tokens", "--dry-run", "--json", env={"DATABASE_URL": url})
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["rows"] == 5
    check = run_cli("check", env={"DATABASE_URL": url})
    assert "TLS" in check.stdout.splitlines()[0] and "no TLS" not in check.stdout.splitlines()[0]


@tls_group
@pytest.mark.parametrize(
    ("query", "host", "fragment"),
    [
        # Prisma's strict without the CA: the system's CAs do not know ours. Refused, not downgraded.
        ({"sslmode": "require", "sslaccept": "strict"}, "localhost", "certificate verify failed"),
        # The certificate names "localhost", not the address.
        ({"sslaccept": "strict", "sslcert": "CA"}, "127.0.0.1", 'does not match host name "127.0.0.1"'),
        # The server takes TLS connections only.
        ({"sslmode": "disable"}, "localhost", "pg_hba.conf rejects connection"),
        # Prisma's sslcert names a file that is not there: refused, never unverified.
        ({"sslaccept": "strict", "sslcert": "/nonexistent/ca.pem"}, "localhost", "/nonexistent/ca.pem"),
    ],
)
def test_tls_that_cannot_be_verified_is_refused_with_one_line_and_exit_2(clusters, query, host, fragment):
    primary, _standby = clusters
    query = {key: str(primary.ca) if value == "CA" else value for key, value in query.items()}
    started = time.monotonic()
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": tls_url(primary, host=host, **query)})
    assert completed.returncode == 2, completed.stderr
    assert time.monotonic() - started < 5
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert fragment in failed["error"]
    assert "retrying" not in [e["event"] for e in events(completed.stderr)]
    assert PASSWORD not in completed.stderr and quote(PASSWORD, safe="") not in completed.stderr


@tls_group
def test_a_wrong_password_exits_2_within_3_seconds_without_retrying_or_showing_it(clusters):
    primary, _standby = clusters
    started = time.monotonic()
    completed = run_cli(
        "refresh-tokens", env={"DATABASE_URL": tls_url(primary, password="wrong-Secret-1", sslmode="require")}
    )
    assert completed.returncode == 2
    assert time.monotonic() - started < 3
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert (
        failed["error"] == f'password authentication failed for user "{ROLE}" (check the user and password of '
        "DATABASE_URL)"
    )
    assert "wrong-Secret-1" not in completed.stderr
    assert "retrying" not in [e["event"] for e in events(completed.stderr)]


@tls_group
def test_a_password_with_shell_and_url_characters_in_the_settings_file_connects(clusters, tmp_path):
    """$, ${HOME}, &, % and # written as they are, in a URL, in the settings file."""
    primary, _standby = clusters
    settings = tmp_path / "env"
    settings.write_text(
        f"DATABASE_URL=postgresql://{ROLE}:{PASSWORD}@localhost:{primary.port}/postgres"
        f"?sslmode=require&sslaccept=strict&sslcert={primary.ca}\n"
    )
    completed = run_cli("refresh-tokens", "--dry-run", "--json", env={"SKYBOT_CLEANUP_ENV_FILE": str(settings)})
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["rows"] == 5
    assert PASSWORD not in completed.stderr + completed.stdout


@tls_group
def test_a_hot_standby_is_refused_in_one_line_and_check_says_so(clusters):
    _primary, standby = clusters
    url = tls_url(standby, sslmode="require")
    completed = run_cli("refresh-tokens", "--batch-size", "2", env={"DATABASE_URL": url})
    assert completed.returncode == 2, completed.stderr
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert failed["error"].startswith("the database is read-only (a hot standby")
    check = run_cli("check", "--json", env={"DATABASE_URL": url})
    findings = [json.loads(line) for line in check.stdout.splitlines()]
    assert check.returncode == 1
    assert (
        "error",
        "the database is a hot standby: every cleanup would fail; point DATABASE_URL at the primary "
        "(with several hosts, add target_session_attrs=read-write)",
    ) in [(f["level"], f["message"]) for f in findings]
    dry = run_cli("refresh-tokens", "--dry-run", env={"DATABASE_URL": url})
    assert dry.returncode == 0, dry.stderr


@tls_group
def test_several_hosts_with_target_session_attrs_find_the_primary(clusters):
    primary, standby = clusters
    url = (
        f"postgresql://{ROLE}:{quote(PASSWORD, safe='')}@localhost:{standby.port},localhost:{primary.port}"
        f"/postgres?sslmode=require&target_session_attrs=read-write"
    )
    completed = run_cli("idempotency-keys", "--json", env={"DATABASE_URL": url})
    assert completed.returncode == 0, completed.stderr


# -- another OS user, the systemd unit's sandbox, node_exporter ------------------------------

os_user_group = pytest.mark.xdist_group("os-user")


def need_root() -> None:
    if not IS_ROOT:
        unavailable("running as another OS user needs root (setpriv)")
    # The interpreter the virtualenv links to must be reachable by other users: one
    # under /root (pyenv) is not, whatever a probe run may show on a machine that
    # papers over it (the sandboxed test then fails inside its exec).
    interpreter = Path(sys.executable).resolve()
    if any(not directory.stat().st_mode & 0o001 for directory in interpreter.parents):
        unavailable(
            f"{interpreter} cannot be run by another user (a directory on its path is closed to "
            "others): make the virtualenv from a system Python, as .ci/run does"
        )


@os_user_group
def test_an_unreadable_settings_file_is_one_line_and_exit_2(tmp_path):
    need_root()
    directory = world_dir("skybot-settings-")
    settings = directory / "env"
    settings.write_text("DATABASE_URL=sqlite:////nonexistent.db\n")
    settings.chmod(0o600)  # root's, as /etc/skybot-cleanup/env would be by mistake
    try:
        completed = run_cli(
            "refresh-tokens",
            user="nobody",
            cwd=directory,
            env={"SKYBOT_CLEANUP_ENV_FILE": str(settings), "SKYBOT_CLEANUP_LOG_FORMAT": "console"},
        )
    finally:
        shutil.rmtree(directory)
    assert completed.returncode == 2
    assert completed.stderr == (
        f"skybot-cleanup: error: cannot read settings file {settings}: Permission denied (running as nobody)\n"
    )


@os_user_group
def test_a_settings_file_in_a_directory_the_user_cannot_enter_is_one_line_and_exit_2():
    need_root()
    private = Path(tempfile.mkdtemp(prefix="skybot-private-"))  # 0700, root's
    settings = private / "env"
    settings.write_text("DATABASE_URL=sqlite:////nonexistent.db\n")
    settings.chmod(0o644)
    try:
        completed = run_cli(
            "refresh-tokens",
            user="nobody",
            cwd=Path("/"),
            env={"SKYBOT_CLEANUP_ENV_FILE": str(settings), "SKYBOT_CLEANUP_LOG_FORMAT": "console"},
        )
    finally:
        shutil.rmtree(private)
    assert completed.returncode == 2
    assert completed.stderr == (
        f"skybot-cleanup: error: cannot read settings file {settings}: Permission denied (running as nobody)\n"
    )


def sqlite_app(path: Path) -> Backend:
    """The app's tables in a SQLite file anyone may write, with one live and two expired tokens."""
    url = f"sqlite:///{path}"
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    metadata = app_metadata()
    metadata.create_all(engine)
    now = utc_now()
    with engine.begin() as conn:
        insert_rows(
            conn,
            metadata,
            {
                "RefreshToken": [
                    refresh_token_row("live", now + HOUR),
                    refresh_token_row("expired_1", now - HOUR),
                    refresh_token_row("expired_2", now - 2 * HOUR),
                ]
            },
        )
    path.chmod(0o666)
    return Backend("sqlite", url, engine)


@os_user_group
def test_a_state_directory_the_user_cannot_enter_never_fails_the_cleanup():
    """HOME=/root for a service user (a common unit-file slip): the spool is out of
    reach, the cleanup and its history are not."""
    need_root()
    shared = world_dir("skybot-db-")
    app = sqlite_app(shared / "app.db")
    try:
        completed = run_cli(
            "refresh-tokens",
            "--json",
            user="nobody",
            cwd=shared,
            env={"DATABASE_URL": app.url, "HOME": "/root", "XDG_STATE_HOME": ""},
        )
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout)["rows"] == 2
        assert app.ids("RefreshToken") == {"live"}
    finally:
        app.engine.dispose()
        shutil.rmtree(shared)


SANDBOXED = """
import ctypes, os, subprocess, sys
os.umask(0o077)  # the unit's UMask=0077
# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): what MemoryDenyWriteExecute=yes applies; inherited.
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()}")
for job in sys.argv[2:]:
    code = subprocess.call([sys.argv[1], job])
    if code:
        sys.exit(code)
"""


@os_user_group
def test_the_systemd_recipe_under_its_sandbox_feeds_node_exporter():
    """The unit's conditions, reproduced: an unprivileged dynamic-style user in the
    prometheus group, UMask=0077, a read-only system but for ReadWritePaths= and the
    state directory, MemoryDenyWriteExecute. node_exporter, as its own user, must
    read every file the runs write. (The database is a SQLite file in the state
    directory, so that any test server's socket permissions stay out of it.)"""
    need_root()
    if shutil.which("unshare") is None:
        unavailable("unshare (util-linux) is not installed")
    textfiles = world_dir("skybot-textfile-")
    state = world_dir("skybot-state-")
    database = state / "app.db"
    engine = sa.create_engine(f"sqlite:///{database}", poolclass=sa.pool.NullPool)
    app_metadata().create_all(engine)
    seed(Backend("sqlite", f"sqlite:///{database}", engine), due=3)
    engine.dispose()
    database.chmod(0o666)
    shutil.chown(textfiles, "root", "prometheus")
    textfiles.chmod(0o2775)  # the README's one-time step: chgrp prometheus, chmod 2775
    uid = 61_234  # no such user, like a DynamicUser
    script = Path(world_dir("skybot-mdwe-")) / "sandboxed.py"
    script.write_text(SANDBOXED)
    script.chmod(0o755)
    environment = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": f"sqlite:///{database}",
        "SKYBOT_CLEANUP_PROM_FILE": str(textfiles),
        "STATE_DIRECTORY": str(state),
        "SKYBOT_CLEANUP_LOG_FORMAT": "json",
        "HOME": "/nonexistent",
    }
    inner = " && ".join(
        [
            f"mount --bind {textfiles} {textfiles}",
            f"mount --bind {state} {state}",
            "mount -o remount,bind,ro /",  # ProtectSystem=strict, roughly: nothing else is writable
            f"exec setpriv --reuid={uid} --regid={uid} --groups=prometheus -- {sys.executable} {script} "
            f"{CONSOLE_SCRIPT} refresh-tokens idempotency-keys metrics",
        ]
    )
    try:
        completed = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", inner],
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
        assert completed.returncode == 0, completed.stderr
        names = sorted(path.name for path in textfiles.iterdir())
        assert names == [
            "skybot_cleanup_idempotency-keys.prom",
            "skybot_cleanup_metrics.prom",
            "skybot_cleanup_refresh-tokens.prom",
            "skybot_cleanup_snapshot.prom",
        ]
        assert all(oct(path.stat().st_mode & 0o777) == "0o644" for path in textfiles.iterdir())
        scraped = scrape_node_exporter(textfiles)
    finally:
        for directory in (textfiles, state, script.parent):
            shutil.rmtree(directory, ignore_errors=True)
    assert "node_textfile_scrape_error 0" in scraped
    assert 'skybot_cleanup_last_success_timestamp_seconds{task="refresh-tokens"}' in scraped
    assert 'skybot_cleanup_last_success_timestamp_seconds{task="idempotency-keys"}' in scraped
    assert 'skybot_cleanup_due_rows{task="refresh-tokens"} 0' in scraped


@pgbouncer_group
def test_no_lock_is_left_on_a_pooled_server_connection(postgres, pgbouncer):
    """The run's session lock is released in the same message as its last COMMIT or
    ROLLBACK, so the server connection PgBouncer hands to the next client holds none,
    whether the run succeeded, failed inside its transaction, or was skipped."""
    seed(postgres, due=6)
    url = pgbouncer.url(postgres.database)
    outcomes = [
        run_cli("refresh-tokens", "--batch-size", "2", env={"DATABASE_URL": url}).returncode,
        run_cli(
            "refresh-tokens", env={"DATABASE_URL": url, "SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN": "nope"}
        ).returncode,
    ]
    with postgres.engine.connect() as holder:
        holder.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtextextended('skybot-cleanup:refresh-tokens', 0))")
        outcomes.append(run_cli("refresh-tokens", env={"DATABASE_URL": url}).returncode)
        holder.rollback()
    assert outcomes == [0, 2, 75]
    with postgres.engine.connect() as conn:
        held = conn.scalar(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        )
    assert held == 0
    again = run_cli("idempotency-keys", "--batch-size", "2", env={"DATABASE_URL": url})
    assert again.returncode == 0, again.stderr
