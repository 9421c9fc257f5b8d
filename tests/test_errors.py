"""Every expected failure is one line and the right exit code, without a secret or a traceback (errors.py)."""

from __future__ import annotations

import json
import logging

import psycopg
import pytest
import sqlalchemy as sa
from helpers import (
    PASSWORD,
    SECRET,
    env_for,
    error_line,
    events,
    invoke,
    run_cli,
    seed_due_and_live,
    shown,
    with_password,
)

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


def test_a_read_only_database_is_one_line_and_exit_2(postgres):
    seed_due_and_live(postgres, due=2)
    postgres.execute(f'ALTER DATABASE "{postgres.database}" SET default_transaction_read_only = on')
    completed = run_cli("refresh-tokens", "--batch-size", "5", env=env_for(postgres))
    assert completed.returncode == 2, completed.stderr
    failed = next(e for e in events(completed.stderr) if e["event"] == "run_failed")
    assert failed["error"].startswith("the database is read-only (a hot standby, or default_transaction_read_only")
    assert "retrying" not in [e["event"] for e in events(completed.stderr)]
    # A dry run only reads: it works.
    assert run_cli("refresh-tokens", "--dry-run", env=env_for(postgres)).returncode == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["refresh-tokens"],
            {},
            "no database URL: set DATABASE_URL or SKYBOT_CLEANUP_DATABASE_URL, or pass --database-url",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": f"mysql://root:{PASSWORD}@localhost/app"},
            "DATABASE_URL has a scheme that is not supported (not shown): use postgres://, postgresql:// or sqlite:///",
        ),
        (
            ["refresh-tokens", "--database-url", f"postgres://u:{PASSWORD}@host:notaport/db"],
            {},
            "DATABASE_URL is not a valid database URL (bad port)",
        ),
        (
            ["revoked-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS": "0"},
            "invalid setting SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS: Input should be greater than or equal to 1",
        ),
        (
            ["revoked-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS": "999999"},
            "invalid setting SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS: Input should be less than or equal to 36500",
        ),
        (
            ["revoked-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS": "1.5"},
            "invalid setting SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS: Input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE": 'RefreshToken"; DROP TABLE x; --'},
            "invalid setting SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE: String should match pattern "
            "'^[A-Za-z_][A-Za-z0-9_$]{0,62}$'",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "JOB_MAX_RETRIES": "many"},
            "invalid setting JOB_MAX_RETRIES: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_RETRY_DELAY_MS": "-5"},
            "invalid setting SKYBOT_CLEANUP_RETRY_DELAY_MS: Input should be greater than or equal to 0",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_BATCH_SIZE": "99999999999999999999"},
            "invalid setting SKYBOT_CLEANUP_BATCH_SIZE: Input should be less than or equal to 1000000",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS": "99999999999"},
            "invalid setting SKYBOT_CLEANUP_LOCK_TIMEOUT_MS: Input should be less than or equal to 86400000",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_SLEEP_MS": "999999999"},
            "invalid setting SKYBOT_CLEANUP_SLEEP_MS: Input should be less than or equal to 600000",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_IDEMPOTENCY_STUCK_MINUTES": "999999999999"},
            "invalid setting SKYBOT_CLEANUP_IDEMPOTENCY_STUCK_MINUTES: Input should be less than or equal to 525600",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_SLEEP_MS": "5000", "SKYBOT_CLEANUP_IDLE_TIMEOUT_S": "5"},
            "invalid settings: SKYBOT_CLEANUP_IDLE_TIMEOUT_S must be at least 1 s more than SKYBOT_CLEANUP_SLEEP_MS",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_SCHEMA": "app-prod"},
            "invalid setting SKYBOT_CLEANUP_SCHEMA: String should match pattern '^[A-Za-z_][A-Za-z0-9_$]{0,62}$'",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "sqlite:///x.db", "SKYBOT_CLEANUP_LOG_FORMAT": "xml"},
            "invalid setting SKYBOT_CLEANUP_LOG_FORMAT: Input should be 'auto', 'json' or 'console'",
        ),
        (
            ["refresh-tokens"],
            {"DATABASE_URL": "postgresql://u@h/db?sslaccept=strict&sslmode=disable"},
            "DATABASE_URL: sslaccept=strict asks for a verified TLS connection, but sslmode=disable allows none",
        ),
    ],
)
def test_configuration_errors_exit_2_with_one_line(args, env, message):
    result = invoke(*args, env=env)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert error_line(result.stderr) == message
    assert result.stdout == ""
    assert PASSWORD not in result.output


def test_a_person_at_a_terminal_gets_a_plain_line():
    result = invoke("refresh-tokens", env={"SKYBOT_CLEANUP_LOG_FORMAT": "console"})
    assert result.stderr == (
        "skybot-cleanup: error: no database URL: set DATABASE_URL or "
        "SKYBOT_CLEANUP_DATABASE_URL, or pass --database-url\n"
    )


def test_unreachable_database_exits_1_after_jittered_retries_without_password_or_traceback():
    # Port 1 on loopback: refused at once, which may pass: retried.
    url = f"postgres://skybot:{PASSWORD}@127.0.0.1:1/app"
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": url, "SKYBOT_CLEANUP_RETRY_DELAY_MS": "10"})
    assert completed.returncode == 1
    assert completed.stdout == ""
    logged = events(completed.stderr)
    assert [event["event"] for event in logged] == ["retrying"] * 3 + ["run_failed", "run_finished"]
    assert {event["error_class"] for event in logged[:3]} == {"OperationalError"}
    # Exponential with jitter: 10 ms, 20 ms, 40 ms, each plus up to 10 ms.
    for event, base in zip(logged[:3], (0.01, 0.02, 0.04), strict=True):
        assert base <= event["delay_s"] <= base + 0.01
    assert "Connection refused" in logged[3]["error"]
    assert PASSWORD not in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    ("url_change", "fragment"),
    [
        ({"username": "no_such_role_here"}, 'role "no_such_role_here" does not exist'),
        ({"database": "no_such_database_here"}, 'database "no_such_database_here" does not exist'),
    ],
)
def test_unknown_role_or_database_exits_2_at_once_without_retrying(postgres, url_change, fragment):
    url = sa.make_url(postgres.url).set(**url_change).render_as_string(hide_password=False)
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": url})
    assert completed.returncode == 2, completed.stderr
    logged = events(completed.stderr)
    assert "retrying" not in [event["event"] for event in logged]
    failed = next(event for event in logged if event["event"] == "run_failed")
    assert fragment in failed["error"] and "(check the" in failed["error"]


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (
            "SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE",
            "RefreshTokens",
            "table {RefreshTokens} not found (setting SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE)",
        ),
        (
            "SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN",
            "revoked_at",
            'column "revoked_at" not found in table {RefreshToken} '
            "(setting SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN)",
        ),
    ],
)
def test_missing_table_or_column_is_a_configuration_error(backend, setting, value, message):
    message = message.format(RefreshTokens=shown(backend, "RefreshTokens"), RefreshToken=shown(backend, "RefreshToken"))
    result = invoke("refresh-tokens", "--json", env={"DATABASE_URL": backend.url, setting: value})
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"] == message
    failed = next(event for event in events(result.stderr) if event["event"] == "run_failed")
    assert failed["error"] == message


def test_an_unexpected_error_is_one_line_exit_1_without_traceback(tmp_path):
    """A directory where the SQLite file should be: nothing the tool classifies."""
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": f"sqlite:///{tmp_path}"})
    assert completed.returncode in (1, 2), completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_library_error_with_a_traceback_is_one_json_event(capsys):
    from skybot_cleanup.logs import configure_logging

    configure_logging("json")
    try:
        raise OSError("the connection is lost\nwith a second line")
    except OSError:
        logging.getLogger("sqlalchemy.pool.impl.NullPool").error("Exception during reset or similar", exc_info=True)
    (line,) = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert {key: event[key] for key in ("event", "level", "logger", "message", "error")} == {
        "event": "library_log",
        "level": "error",
        "logger": "sqlalchemy.pool.impl.NullPool",
        "message": "Exception during reset or similar",
        "error": "OSError: the connection is lost",
    }


def test_debug_shows_the_traceback_of_a_failed_run_and_still_its_one_line(sqlite):
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "Nope"}
    env["SKYBOT_CLEANUP_LOG_FORMAT"] = "console"
    quiet = run_cli("magic-links", env=env)
    debugging = run_cli("magic-links", env={**env, "SKYBOT_CLEANUP_DEBUG": "1"})
    assert quiet.returncode == debugging.returncode == 2
    assert "Traceback (most recent call last)" not in quiet.stderr
    assert "Traceback (most recent call last)" in debugging.stderr
    assert 'magic-links failed: table "Nope" not found' in debugging.stderr.splitlines()[-1]


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


def test_a_password_the_server_echoes_in_plain_text_is_never_shown(postgres, tmp_path):
    """Not every message holds a password in URL form (a trigger, an extension, a proxy may
    echo it bare): the run's own secrets list is what hides it, in every channel."""
    seed_due_and_live(postgres, due=3)
    postgres.execute(f"""
        CREATE FUNCTION public.echo_password() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'rejected login with password {PASSWORD}'; END $$;
        CREATE TRIGGER echo_password BEFORE DELETE ON public."RefreshToken"
            FOR EACH ROW EXECUTE FUNCTION public.echo_password();
    """)
    url = with_password(postgres.url, PASSWORD)
    env = {
        "DATABASE_URL": url,
        "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path / "prom"),
        "SKYBOT_CLEANUP_STATE_DIR": str(tmp_path / "state"),
    }
    (tmp_path / "prom").mkdir()
    completed = run_cli("refresh-tokens", "--json", env=env)
    assert completed.returncode == 1, completed.stderr
    assert "rejected login with password ***" in completed.stderr
    listed = run_cli("history", "--json", env=env)
    assert "rejected login with password ***" in listed.stdout
    shown_anywhere = [completed.stdout, completed.stderr, listed.stdout, listed.stderr]
    shown_anywhere += [path.read_text() for path in tmp_path.rglob("*") if path.is_file()]
    assert all(PASSWORD not in text for text in shown_anywhere)
