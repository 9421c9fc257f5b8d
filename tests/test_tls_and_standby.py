"""A real TLS cluster with a hot standby: verification, passwords, read-only refusal, several hosts."""

from __future__ import annotations

import contextlib
import json
import os
from urllib.parse import quote

import pytest
from components import IS_ROOT, Cluster, start_cluster
from helpers import HOUR, events, least_privilege_grants, run_cli, unavailable

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import insert_rows, refresh_token_row

# What issue #9 asks a settings file to carry through untouched.
TLS_PASSWORD = "pa$word${HOME}x&y%z#1"


tls_group = pytest.mark.xdist_group("tls")


ROLE = "skybot_app"


@pytest.fixture(scope="module")
def clusters() -> tuple[Cluster, Cluster]:
    if not IS_ROOT and os.environ.get("USER") != "postgres":
        unavailable("the TLS cluster is started as the postgres user: run the tests as root")
    generator = start_cluster(ROLE, TLS_PASSWORD)
    primary, standby = next(generator)
    engine = primary.superuser_engine()
    metadata = app_metadata()
    metadata.create_all(engine)
    now = utc_now()
    with engine.begin() as conn:
        insert_rows(conn, metadata, {"RefreshToken": [refresh_token_row(f"due_{i}", now - HOUR) for i in range(5)]})
        for statement in least_privilege_grants(ROLE):
            conn.exec_driver_sql(statement)
    engine.dispose()
    primary.psql("SELECT pg_switch_wal()")
    yield primary, standby
    with contextlib.suppress(StopIteration):
        next(generator)


def tls_url(cluster: Cluster, host: str = "localhost", password: str = TLS_PASSWORD, **query: str) -> str:
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
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": tls_url(primary, host=host, **query)})
    assert completed.returncode == 2, completed.stderr
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert fragment in failed["error"]
    assert "retrying" not in [e["event"] for e in events(completed.stderr)]
    assert TLS_PASSWORD not in completed.stderr and quote(TLS_PASSWORD, safe="") not in completed.stderr


@tls_group
def test_a_wrong_password_exits_2_at_once_without_retrying_or_showing_it(clusters):
    primary, _standby = clusters
    completed = run_cli(
        "refresh-tokens", env={"DATABASE_URL": tls_url(primary, password="wrong-Secret-1", sslmode="require")}
    )
    assert completed.returncode == 2
    assert "retrying" not in [e["event"] for e in events(completed.stderr)]
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert (
        failed["error"] == f'password authentication failed for user "{ROLE}" (check the user and password of '
        "DATABASE_URL)"
    )
    assert "wrong-Secret-1" not in completed.stderr
    assert "retrying" not in [e["event"] for e in events(completed.stderr)]


@tls_group
def test_a_password_with_shell_and_url_characters_in_the_settings_file_connects(clusters, tmp_path):
    """$, ${HOME}, & and % written as they are, in a URL, in the settings file (# encoded,
    as a URL must have it)."""
    primary, _standby = clusters
    settings = tmp_path / "env"
    settings.write_text(
        f"DATABASE_URL=postgresql://{ROLE}:{TLS_PASSWORD.replace('#', '%23')}@localhost:{primary.port}/postgres"
        f"?sslmode=require&sslaccept=strict&sslcert={primary.ca}\n"
    )
    completed = run_cli("refresh-tokens", "--dry-run", "--json", env={"SKYBOT_CLEANUP_ENV_FILE": str(settings)})
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["rows"] == 5
    assert TLS_PASSWORD not in completed.stderr + completed.stdout


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
        f"postgresql://{ROLE}:{quote(TLS_PASSWORD, safe='')}@localhost:{standby.port},localhost:{primary.port}"
        f"/postgres?sslmode=require&target_session_attrs=read-write"
    )
    completed = run_cli("idempotency-keys", "--json", env={"DATABASE_URL": url})
    assert completed.returncode == 0, completed.stderr
