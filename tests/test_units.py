"""The pure logic, table by table: URLs, failure classes, exit codes, redaction, health."""

from __future__ import annotations

from datetime import datetime, timedelta

import psycopg
import pytest

from skybot_cleanup.db import parse_database_url
from skybot_cleanup.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    ConfigError,
    Interrupted,
    LockHeld,
    classify,
    redact,
    worst_exit_code,
)
from skybot_cleanup.schedule import health

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("raw", "conninfo", "schema"),
    [
        ("postgres://u:p@h:5432/db", "postgresql://u:p@h:5432/db", None),
        ("postgresql://u@h/db?schema=tenant", "postgresql://u@h/db", "tenant"),
        ("POSTGRESQL+psycopg://u@h/db", "postgresql://u@h/db", None),
        # Every Prisma-only parameter is dropped; libpq's own are kept in order.
        (
            "postgresql://u@h/db?connection_limit=5&pool_timeout=10&pgbouncer=true&socket_timeout=5"
            "&statement_cache_size=0&max_connection_lifetime=1&max_idle_connection_lifetime=2&application_name=x"
            "&connect_timeout=3&sslmode=require",
            "postgresql://u@h/db?application_name=x&connect_timeout=3&sslmode=require",
            None,
        ),
        # Sockets and several hosts: libpq parses them, we only pass them through.
        ("postgresql://u@%2Fvar%2Frun%2Fpostgresql/db", "postgresql://u@%2Fvar%2Frun%2Fpostgresql/db", None),
        ("postgresql://u@/db?host=/var/run/postgresql", "postgresql://u@/db?host=%2Fvar%2Frun%2Fpostgresql", None),
        (
            "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write",
            "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write",
            None,
        ),
        ("postgresql://u@[::1]:5432/db", "postgresql://u@[::1]:5432/db", None),
        # An unencoded "@" (or ":") in the password: the userinfo ends at the last "@".
        ("postgresql://u:Sec@ret:x@127.0.0.1/db", "postgresql://u:Sec%40ret%3Ax@127.0.0.1/db", None),
        ("postgresql://u:a%23b@h/db", "postgresql://u:a%23b@h/db", None),
    ],
)
def test_database_urls(raw, conninfo, schema):
    target = parse_database_url(raw)
    assert (target.conninfo, target.schema, target.kind) == (conninfo, schema, "postgresql")


def test_the_schema_setting_overrides_the_urls():
    assert parse_database_url("postgresql://u@h/db?schema=a", "b").schema == "b"


@pytest.mark.parametrize(
    ("query", "libpq"),
    [
        # Prisma's sslaccept=strict: verify the certificate and host name, against the
        # system's CAs unless sslcert (Prisma: the CA or server certificate) is given.
        ("sslmode=require&sslaccept=strict", "sslrootcert=system&sslmode=verify-full"),
        ("sslaccept=strict&sslcert=ca.pem", "sslrootcert=ca.pem&sslmode=verify-full"),
        ("sslmode=prefer&sslaccept=strict&sslcert=/etc/ca.pem", "sslrootcert=%2Fetc%2Fca.pem&sslmode=verify-full"),
        # Without strict, Prisma does not verify; libpq with a root certificate verifies the CA: never less.
        ("sslmode=require&sslcert=ca.pem", "sslmode=require&sslrootcert=ca.pem"),
        ("sslmode=require&sslaccept=accept_invalid_certs", "sslmode=require"),
        # With sslkey, sslcert keeps libpq's meaning: a client certificate.
        (
            "sslmode=verify-full&sslrootcert=ca.pem&sslcert=c.crt&sslkey=c.key",
            "sslmode=verify-full&sslrootcert=ca.pem&sslkey=c.key&sslcert=c.crt",
        ),
    ],
)
def test_prisma_tls_parameters_in_libpq_terms(query, libpq):
    assert parse_database_url(f"postgresql://u@h/db?{query}").conninfo == f"postgresql://u@h/db?{libpq}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "no database URL"),
        ("mysql://u@h/db", "DATABASE_URL scheme 'mysql' is not supported"),
        ("just-a-host", "expected scheme://"),
        ("postgresql://u@h:port/db", "bad port"),
        ("postgresql://u@h/db?schema=a-b", "not a valid schema name"),
        ("postgresql://u@h/db?sslidentity=id.p12&sslpassword=" + SECRET, "sslidentity (a PKCS#12 client identity)"),
        ("postgresql://u@h/db?sslaccept=maybe", "is not strict or accept_invalid_certs"),
        ("postgresql://u@h/db?sslaccept=strict&sslmode=disable", "but sslmode=disable allows none"),
    ],
)
def test_bad_urls_are_configuration_errors_without_the_secret(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        parse_database_url(raw)
    assert SECRET not in str(caught.value)


def test_the_display_form_masks_the_password():
    target = parse_database_url(f"postgres://u:{SECRET}@h/db?password={SECRET}&sslmode=require")
    assert SECRET not in target.display
    assert target.display == "postgresql://u:***@h/db?password=***&sslmode=require"
    assert SECRET in target.secrets


def connection_error(text: str) -> psycopg.OperationalError:
    return psycopg.OperationalError(text)


@pytest.mark.parametrize(
    ("text", "exit_code", "transient"),
    [
        (
            'connection failed: connection to server at "h", port 5432 failed: FATAL:  password authentication failed '
            'for user "u"',
            EXIT_CONFIG,
            False,
        ),
        ('connection failed: ... failed: FATAL:  role "ghost" does not exist', EXIT_CONFIG, False),
        ('connection failed: ... failed: FATAL:  database "nope" does not exist', EXIT_CONFIG, False),
        (
            'connection failed: ... failed: FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "u", database "d", '
            "no encryption",
            EXIT_CONFIG,
            False,
        ),
        ("connection failed: ... failed: server does not support SSL, but SSL was required", EXIT_CONFIG, False),
        ("connection failed: ... failed: SSL error: certificate verify failed", EXIT_CONFIG, False),
        (
            'connection failed: ... failed: server certificate for "localhost" does not match host name "127.0.0.1"',
            EXIT_CONFIG,
            False,
        ),
        ('connection failed: ... failed: root certificate file "/x.pem" does not exist', EXIT_CONFIG, False),
        ("connection failed: ... failed: FATAL:  no such database: app", EXIT_CONFIG, False),  # PgBouncer
        ('connection failed: connection to server at "h", port 1 failed: Connection refused', EXIT_FAILURE, True),
        ("connection failed: ... failed: timeout expired", EXIT_FAILURE, True),
        ("connection failed: ... failed: FATAL:  the database system is starting up", EXIT_FAILURE, True),
        ("connection failed: ... failed: FATAL:  query_wait_timeout", EXIT_FAILURE, True),  # PgBouncer
        ("consuming input failed: server closed the connection unexpectedly", EXIT_FAILURE, True),
    ],
)
def test_connection_errors_are_classified_by_their_text(text, exit_code, transient):
    failure = classify(connection_error(text))
    assert (failure.exit_code, failure.transient) == (exit_code, transient)
    if exit_code == EXIT_CONFIG:
        assert "(check the" in failure.message or "pg_hba" in failure.message


class FakeSqlstateError(Exception):
    __module__ = "psycopg.errors"

    def __init__(self, sqlstate: str, message: str = "boom"):
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "exit_code", "transient"),
    [
        ("42P01", EXIT_CONFIG, False),
        ("42703", EXIT_CONFIG, False),
        ("42501", EXIT_CONFIG, False),
        ("3D000", EXIT_CONFIG, False),
        ("28P01", EXIT_CONFIG, False),
        ("25006", EXIT_CONFIG, False),
        ("40001", EXIT_FAILURE, True),
        ("40P01", EXIT_FAILURE, True),
        ("55P03", EXIT_FAILURE, True),
        ("57P01", EXIT_FAILURE, True),
        ("57P03", EXIT_FAILURE, True),
        ("08006", EXIT_FAILURE, True),
        ("53300", EXIT_FAILURE, True),
        ("57014", EXIT_FAILURE, False),
        ("22012", EXIT_FAILURE, False),
    ],
)
def test_sqlstates_are_classified(sqlstate, exit_code, transient):
    failure = classify(FakeSqlstateError(sqlstate))
    assert (failure.exit_code, failure.transient) == (exit_code, transient)


def test_expected_failures_and_signals_are_classified():
    assert classify(LockHeld("held")).exit_code == 75
    assert classify(ConfigError("bad")).exit_code == 2
    assert classify(Interrupted(15)).exit_code == 143
    assert classify(ValueError("x")).exit_code == 1 and not classify(ValueError("x")).transient


@pytest.mark.parametrize(
    ("codes", "worst"),
    [
        ([], 0),
        ([0, 0], 0),
        ([0, 75], 75),
        ([75, 143, 0], 143),
        ([143, 1], 1),
        ([1, 2], 2),
        ([2, 1, 75, 130], 2),
        ([0, 1, 0], 1),
        ([130, 143], 130),
    ],
)
def test_worst_exit_code_precedence(codes, worst):
    assert worst_exit_code(codes) == worst


@pytest.mark.parametrize(
    ("text", "secrets", "redacted"),
    [
        (f"postgresql://u:{SECRET}@h/db", (), "postgresql://u:***@h/db"),
        (
            "failed to resolve host 'ret@127.0.0.1' for postgres://u:Sec@ret@127.0.0.1/db",
            (),
            "failed to resolve host 'ret@127.0.0.1' for postgres://u:***@127.0.0.1/db",
        ),
        (f"error near {SECRET} here", (SECRET,), "error near *** here"),
        ("nothing secret", ("",), "nothing secret"),
    ],
)
def test_redaction(text, secrets, redacted):
    assert redact(text, secrets) == redacted


NOW = datetime(2026, 11, 28, 12, 30)


@pytest.mark.parametrize(
    ("last_success", "last_status", "first_seen", "expected"),
    [
        (None, None, None, "PENDING"),  # a brand-new install
        (None, None, NOW - timedelta(minutes=40), "PENDING"),  # first run at 13:00, grace till 13:30
        (None, None, NOW - timedelta(hours=3), "OVERDUE"),  # its first scheduled run came and went
        (NOW - timedelta(minutes=30), None, NOW - timedelta(days=9), "OK"),
        (NOW - timedelta(hours=2, minutes=1), "ok", NOW - timedelta(days=9), "OVERDUE"),
        (NOW - timedelta(minutes=30), "failed", NOW - timedelta(days=9), "FAILING"),
        (None, "failed", None, "FAILING"),
    ],
)
def test_job_health(last_success, last_status, first_seen, expected):
    assert (
        health(
            "0 * * * *",
            last_success=last_success,
            last_status=last_status,
            first_seen=first_seen,
            now=NOW,
            grace=timedelta(minutes=30),
        )
        == expected
    )
