"""The local spool: runs the database could not take wait in the state directory (spool.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import sqlalchemy as sa
from components import need_root, world_dir
from helpers import HOUR, Backend, history_rows, os_user_group, run_cli, seed_operator_data, unreachable_twin

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.clock import utc_now
from skybot_cleanup.db import parse_database_url
from skybot_cleanup.demo import insert_rows, refresh_token_row


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


def test_a_malformed_spool_file_is_set_aside_and_the_run_succeeds(sqlite, tmp_path):
    seed_operator_data(sqlite)
    spool = tmp_path / "state-dir" / "pending-runs"
    spool.mkdir(parents=True)
    identity = parse_database_url(sqlite.url).identity
    (spool / "20261101T000000000000-x.json").write_text(json.dumps({"database": identity, "run_id": "x"}))
    (spool / "20261101T000000000001-y.json").write_text("{not json")
    completed = run_cli(
        "refresh-tokens", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_STATE_DIR": str(spool.parent)}
    )
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in spool.iterdir()) == [
        "20261101T000000000000-x.json.bad",
        "20261101T000000000001-y.json.bad",
    ]
    assert [(r["task"], r["status"]) for r in history_rows(sqlite)] == [("refresh-tokens", "ok")]
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live", "revoked_100d"}


def test_a_stale_claim_of_a_dead_run_is_recorded_once(postgres, tmp_path):
    state = tmp_path / "state-dir"
    down = run_cli(
        "magic-links",
        env={
            "DATABASE_URL": unreachable_twin(postgres.url),
            "SKYBOT_CLEANUP_STATE_DIR": str(state),
            "SKYBOT_CLEANUP_MAX_RETRIES": "0",
        },
    )
    assert down.returncode == 1
    (spooled,) = (state / "pending-runs").glob("*.json")
    # A run that claimed it and was killed before recording it (pid 2**22 + 1 does not exist).
    spooled.rename(spooled.with_name(f"{spooled.name}.claimed-{2**22 + 1}"))
    completed = run_cli("magic-links", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)})
    assert completed.returncode == 0, completed.stderr
    assert [(r["task"], r["status"], r["exit_code"]) for r in history_rows(postgres)] == [
        ("magic-links", "failed", 1),
        ("magic-links", "ok", 0),
    ]
    assert list((state / "pending-runs").iterdir()) == []
