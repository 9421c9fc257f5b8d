"""The local spool: runs the database could not take wait in the state directory (spool.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from components import need_root, world_dir
from helpers import HOUR, Backend, events, history_rows, os_user_group, run_cli, seed_operator_data, unreachable_twin

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


def unreachable_run(env: dict[str, str], **kwargs) -> subprocess.CompletedProcess[str]:
    """A run that cannot reach its database, so it must spool its record."""
    url = "postgresql://skybot@127.0.0.1:1/app"
    return run_cli("refresh-tokens", env={"DATABASE_URL": url, "SKYBOT_CLEANUP_MAX_RETRIES": "0", **env}, **kwargs)


def owned_by_nobody(path: Path) -> Path:
    import pwd

    nobody = pwd.getpwnam("nobody")
    os.lchown(path, nobody.pw_uid, nobody.pw_gid)
    return path


@pytest.mark.parametrize("planted", ["pending-runs link", "state directory link", "state directory"])
def test_a_root_run_never_writes_through_another_users_state_directory(tmp_path, planted):
    """As root, beside a state directory an unprivileged user owns or links: the spool is
    not used at all, and no file outside it changes."""
    need_root()
    target = tmp_path / "root-only"  # where the planted links point: a directory of root's
    target.mkdir(mode=0o700)
    theirs = owned_by_nobody(world_dir("skybot-theirs-"))
    state = theirs / "state"
    if planted == "pending-runs link":
        state.mkdir()
        owned_by_nobody(state)
        (state / "pending-runs").symlink_to(target)
        owned_by_nobody(state / "pending-runs")
    elif planted == "state directory link":
        state.symlink_to(target)
        owned_by_nobody(state)
    else:
        state.mkdir()
        owned_by_nobody(state)
    completed = unreachable_run({"SKYBOT_CLEANUP_STATE_DIR": str(state)})
    assert completed.returncode == 1
    unusable = [event for event in events(completed.stderr) if event["event"] == "state_directory_unusable"]
    assert len(unusable) == 1 and "uid" in unusable[0]["error"]
    assert list(target.iterdir()) == []
    if planted == "state directory":
        assert list(state.iterdir()) == []
    shutil.rmtree(theirs)


def test_spool_files_are_0600_in_a_0700_directory_whatever_the_umask(tmp_path):
    state = tmp_path / "state"
    completed = unreachable_run({"SKYBOT_CLEANUP_STATE_DIR": str(state)}, umask=0o002)
    assert completed.returncode == 1
    (entry,) = (state / "pending-runs").iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "pending-runs").stat().st_mode) == 0o700
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_forged_or_foreign_entry_is_quarantined_never_replayed(postgres, tmp_path):
    """Entries the tool did not write with its own hands: a file another user owns, one
    others may read, one that is a link. None reaches the history; each is set aside."""
    need_root()
    state = tmp_path / "state"
    unreachable_run({"SKYBOT_CLEANUP_STATE_DIR": str(state)})
    spool = state / "pending-runs"
    (genuine,) = spool.iterdir()
    entry = json.loads(genuine.read_text())
    identity = parse_database_url(postgres.url).identity
    forged = {**entry, "database": identity, "status": "ok", "task": "refresh-tokens", "run_id": "forged"}
    genuine.unlink()
    for name, mode, owner in (("a-foreign.json", 0o600, "nobody"), ("b-readable.json", 0o644, None)):
        path = spool / name
        path.write_text(json.dumps(forged))
        path.chmod(mode)
        if owner:
            owned_by_nobody(path)
    (spool / "c-link.json").symlink_to(spool / "b-readable.json")
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)})
    assert completed.returncode == 0, completed.stderr
    assert "forged" not in {row["run_id"] for row in history_rows(postgres)}
    assert sorted(path.name for path in spool.iterdir()) == [
        "a-foreign.json.bad",
        "b-readable.json.bad",
        "c-link.json.bad",
    ]
    assert "spool_entry_quarantined" in [event["event"] for event in events(completed.stderr)]


def test_a_failed_spool_write_leaves_no_partial_file(tmp_path):
    """A full disk, as a file-size limit: the write fails, and nothing half-written stays."""
    state = tmp_path / "state"
    completed = unreachable_run({"SKYBOT_CLEANUP_STATE_DIR": str(state)}, file_size_limit=64)
    assert completed.returncode == 1
    assert "run_not_recorded" in [event["event"] for event in events(completed.stderr)]
    assert list((state / "pending-runs").iterdir()) == []
