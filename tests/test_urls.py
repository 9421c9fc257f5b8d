"""DATABASE_URL in every form Render, Prisma and libpq write it (db/urls.py)."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from helpers import HOUR, SECRET, error_line, run_cli, seed_operator_data, seed_tokens, with_password, with_query

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.clock import utc_now
from skybot_cleanup.db import parse_database_url
from skybot_cleanup.demo import insert_rows, refresh_token_row
from skybot_cleanup.errors import (
    ConfigError,
)


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_render_and_prisma_url_forms_with_schema(postgres, scheme):
    """Tables in a non-public schema, selected by Prisma's ?schema=, beside decoys in public."""
    now = utc_now()
    postgres.execute('CREATE SCHEMA "tenant_app"')
    metadata = app_metadata(schema="tenant_app")
    metadata.create_all(postgres.engine)
    with postgres.engine.begin() as conn:
        insert_rows(
            conn,
            metadata,
            {"RefreshToken": [refresh_token_row("app_expired", now - HOUR), refresh_token_row("app_live", now + HOUR)]},
            "tenant_app",
        )
    postgres.insert("RefreshToken", [refresh_token_row("public_expired", now - HOUR)])
    url = scheme + "://" + postgres.url.split("://", 1)[1]
    url = with_query(
        url,
        schema="tenant_app",
        connection_limit="5",
        pool_timeout="10",
        pgbouncer="true",
        socket_timeout="5",
        statement_cache_size="0",
    )

    completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": url})

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["rows"] == 1
    with postgres.engine.connect() as conn:
        left = set(conn.scalars(sa.text('SELECT id FROM tenant_app."RefreshToken"')))
    assert left == {"app_live"}
    assert postgres.ids("RefreshToken") == {"public_expired"}


def test_libpq_options_in_the_url_survive(postgres):
    seed_operator_data(postgres)
    url = postgres.url + ("&" if "?" in postgres.url else "?") + "options=-c%20TimeZone%3DPacific/Kiritimati"
    completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": url})
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["rows"] == 2
    assert postgres.ids("RefreshToken") == {"live_1", "live_2", "revoked_live", "revoked_100d"}


@pytest.mark.parametrize(
    ("raw", "conninfo", "schema"),
    [
        ("postgres://u:p@h:5432/db", "postgresql://u:p@h:5432/db", "public"),
        ("postgresql://u@h/db?schema=tenant", "postgresql://u@h/db", "tenant"),
        ("POSTGRESQL+psycopg://u@h/db", "postgresql://u@h/db", "public"),
        # Every Prisma-only parameter is dropped; libpq's own are kept in order.
        (
            "postgresql://u@h/db?connection_limit=5&pool_timeout=10&pgbouncer=true&socket_timeout=5"
            "&statement_cache_size=0&max_connection_lifetime=1&max_idle_connection_lifetime=2&application_name=x"
            "&connect_timeout=3&sslmode=require",
            "postgresql://u@h/db?application_name=x&connect_timeout=3&sslmode=require",
            "public",
        ),
        # Sockets and several hosts: libpq parses them, we only pass them through.
        ("postgresql://u@%2Fvar%2Frun%2Fpostgresql/db", "postgresql://u@%2Fvar%2Frun%2Fpostgresql/db", "public"),
        ("postgresql://u@/db?host=/var/run/postgresql", "postgresql://u@/db?host=%2Fvar%2Frun%2Fpostgresql", "public"),
        (
            "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write",
            "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write",
            "public",
        ),
        ("postgresql://u@[::1]:5432/db", "postgresql://u@[::1]:5432/db", "public"),
        # ":" in the password needs no encoding; "@" must be encoded (an unencoded one is refused).
        ("postgresql://u:Sec%40ret:x@127.0.0.1/db", "postgresql://u:Sec%40ret%3Ax@127.0.0.1/db", "public"),
        ("postgresql://u:a%23b@h/db", "postgresql://u:a%23b@h/db", "public"),
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
        ("mysql://u@h/db", "DATABASE_URL has a scheme that is not supported (not shown)"),
        # Whatever is wrong, the message names it and quotes nothing (a URL file may be the wrong file).
        (f"PGPASSWORD={SECRET}\nDATABASE_URL=postgresql://u@h/db", "scheme that is not supported (not shown)"),
        (f"sqlite://u:{SECRET}@h:port/db", "DATABASE_URL is not a valid sqlite:/// URL"),
        (f"postgresql://u@h/db?sslaccept={SECRET}", "its sslaccept (not shown) is not strict or accept_invalid_certs"),
        ("just-a-host", "expected scheme://"),
        ("postgresql://u@h:port/db", "bad port"),
        ("postgresql://u@h/db?schema=a-b", "not a valid schema name"),
        ("postgresql://u@h/db?sslidentity=id.p12&sslpassword=" + SECRET, "sslidentity (a PKCS#12 client identity)"),
        ("postgresql://u@h/db?sslaccept=strict&sslmode=disable", "but sslmode=disable allows none"),
    ],
)
def test_bad_urls_are_configuration_errors_without_the_secret(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        parse_database_url(raw)
    assert SECRET.lower() not in str(caught.value).lower()  # the scheme was once quoted, lowercased


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user@:5432/db",
        "postgresql://:5432/db",
        "postgresql://user@[]:5432/db",
        "postgresql://user@h1:5432,:5433/db",
        "postgresql://user@h1,,h2/db",
        "postgresql://user@h/db?host=h1,",
        "postgresql://user@h/db?host=,%2Ftmp",
    ],
)
def test_a_url_that_leaves_a_host_empty_is_refused(url):
    """libpq takes an empty host as the local socket: a URL with a port but no host
    would silently reach whatever listens there."""
    with pytest.raises(ConfigError, match="DATABASE_URL leaves a host empty"):
        parse_database_url(url)


@pytest.mark.parametrize(
    ("url", "conninfo"),
    [
        # A socket directory named in the query, with or without a port in the authority.
        (
            "postgresql://user@:5432/db?host=/var/run/postgresql",
            "postgresql://user@:5432/db?host=%2Fvar%2Frun%2Fpostgresql",
        ),
        ("postgresql://user@/db?host=/tmp", "postgresql://user@/db?host=%2Ftmp"),
        # An address without a name: libpq connects to hostaddr.
        ("postgresql://user@:5432/db?hostaddr=127.0.0.1", "postgresql://user@:5432/db?hostaddr=127.0.0.1"),
        ("postgresql://user@%2Fvar%2Frun%2Fpostgresql:5432/db", "postgresql://user@%2Fvar%2Frun%2Fpostgresql:5432/db"),
    ],
)
def test_a_socket_directory_or_an_address_names_the_server(url, conninfo):
    assert parse_database_url(url).conninfo == conninfo


def test_a_port_without_a_host_is_one_line_and_exit_2_before_anything_connects(postgres, tmp_path):
    """The URL the review used: before, it connected through the local socket and ran."""
    seed_tokens(postgres)
    url = f"postgresql://postgres@:5432/{postgres.database}"
    completed = run_cli(
        "refresh-tokens",
        env={"DATABASE_URL": url, "XDG_STATE_HOME": str(tmp_path), "SKYBOT_CLEANUP_LOG_FORMAT": "console"},
    )
    assert (completed.returncode, completed.stdout) == (2, "")
    assert completed.stderr.startswith("skybot-cleanup: error: DATABASE_URL leaves a host empty")
    assert len(completed.stderr.splitlines()) == 1
    assert postgres.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}


def test_the_display_form_masks_the_password():
    target = parse_database_url(f"postgres://u:{SECRET}@h/db?password={SECRET}&sslmode=require")
    assert SECRET not in target.display
    assert target.display == "postgresql://u:***@h/db?password=***&sslmode=require"
    assert SECRET in target.secrets


@pytest.mark.parametrize("url", ["postgresql://", "postgresql://:@/", "postgres://u:pw@/", "postgresql://h"])
def test_a_url_that_names_no_server_and_database_is_refused(url, tmp_path):
    """libpq would fill the gaps with the local socket and the OS user's name, and the run
    would create its history in whatever database that is."""
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": url, "XDG_STATE_HOME": str(tmp_path)})
    assert completed.returncode == 2
    assert "DATABASE_URL names no" in error_line(completed.stderr)
    assert len(completed.stderr.splitlines()) == 1 or all(
        line.startswith("{") for line in completed.stderr.splitlines()
    )


@pytest.mark.parametrize("reserved", list("/?#@[]"))
def test_a_password_with_a_reserved_character_is_never_shown_encoded_or_not(postgres, tmp_path, reserved):
    head, tail = "Hunter2xyz", "SECRETtail"
    password = f"{head}{reserved}{tail}"
    base = with_password(postgres.url, "{}")
    env = {
        "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path / "prom"),
        "SKYBOT_CLEANUP_STATE_DIR": str(tmp_path / "state"),
        "SKYBOT_CLEANUP_DEBUG": "1",
    }
    (tmp_path / "prom").mkdir()
    commands = [["refresh-tokens"], ["all", "--dry-run"], ["metrics"], ["status"], ["check"], ["history"], ["config"]]
    for form, expected in ((password, 2), (quote(password, safe=""), 0)):
        env["DATABASE_URL"] = base.format(form)
        for command in commands:
            completed = run_cli(*command, env=env)
            shown = completed.stdout + completed.stderr
            assert head not in shown and tail not in shown, (command, shown)
            if command[0] in ("refresh-tokens", "check") and expected == 2:
                assert completed.returncode == 2 and "percent-encode" in error_line(completed.stderr), shown
            if command[0] == "refresh-tokens" and expected == 0:
                assert completed.returncode == 0, shown
    for path in tmp_path.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert head not in text and tail not in text, path
