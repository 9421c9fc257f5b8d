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
from helpers import (
    HOUR,
    Backend,
    events,
    history_rows,
    os_user_group,
    outage,
    run_cli,
    run_release,
    seed_operator_data,
)

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.clock import utc_now
from skybot_cleanup.db import parse_database_url
from skybot_cleanup.demo import insert_rows, refresh_token_row
from skybot_cleanup.spool import EARLIER_PENDING_RUNS, MAX_TEXT_CHARS, PENDING_RUNS


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
    spool = tmp_path / "state-dir" / PENDING_RUNS
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
    down = run_cli("magic-links", env=outage(postgres.url, state))
    assert down.returncode == 1
    (spooled,) = (state / PENDING_RUNS).glob("*.json")
    # A run that claimed it and was killed before recording it (pid 2**22 + 1 does not exist).
    spooled.rename(spooled.with_name(f"{spooled.name}.claimed-{2**22 + 1}"))
    completed = run_cli("magic-links", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)})
    assert completed.returncode == 0, completed.stderr
    assert [(r["task"], r["status"], r["exit_code"]) for r in history_rows(postgres)] == [
        ("magic-links", "failed", 1),
        ("magic-links", "ok", 0),
    ]
    assert list((state / PENDING_RUNS).iterdir()) == []


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
        (state / PENDING_RUNS).symlink_to(target)
        owned_by_nobody(state / PENDING_RUNS)
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
    (entry,) = (state / PENDING_RUNS).iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / PENDING_RUNS).stat().st_mode) == 0o700
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_forged_or_foreign_entry_is_quarantined_never_replayed(postgres, tmp_path):
    """Entries someone else could have written: a file another user owns, one others may
    write, one that is a link. None reaches the history; each is set aside."""
    need_root()
    state = tmp_path / "state"
    unreachable_run({"SKYBOT_CLEANUP_STATE_DIR": str(state)})
    spool = state / PENDING_RUNS
    (genuine,) = spool.iterdir()
    entry = json.loads(genuine.read_text())
    identity = parse_database_url(postgres.url).identity
    forged = {**entry, "database": identity, "status": "ok", "task": "refresh-tokens", "run_id": "forged"}
    genuine.unlink()
    for name, mode, owner in (("a-foreign.json", 0o600, "nobody"), ("b-writable.json", 0o620, None)):
        path = spool / name
        path.write_text(json.dumps(forged))
        path.chmod(mode)
        if owner:
            owned_by_nobody(path)
    (spool / "c-link.json").symlink_to(spool / "b-writable.json")
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)})
    assert completed.returncode == 0, completed.stderr
    assert "forged" not in {row["run_id"] for row in history_rows(postgres)}
    assert sorted(path.name for path in spool.iterdir()) == [
        "a-foreign.json.bad",
        "b-writable.json.bad",
        "c-link.json.bad",
    ]
    assert "spool_entry_quarantined" in [event["event"] for event in events(completed.stderr)]


def test_a_failed_spool_write_leaves_no_partial_file(tmp_path):
    """A full disk, as a file-size limit: the write fails, and nothing half-written stays."""
    state = tmp_path / "state"
    completed = unreachable_run({"SKYBOT_CLEANUP_STATE_DIR": str(state)}, file_size_limit=64)
    assert completed.returncode == 1
    assert "run_not_recorded" in [event["event"] for event in events(completed.stderr)]
    assert list((state / PENDING_RUNS).iterdir()) == []


def test_a_long_error_text_is_cut_when_spooled_and_an_uncut_earlier_entry_is_still_recorded(sqlite, tmp_path):
    """A run whose error is 100,000 characters long, and whose history cannot be written:
    its entry keeps the error's first MAX_TEXT_CHARS, and is recorded once the history
    is back. An earlier release wrote such entries whole: one over 64 KiB is recorded
    too, never set aside."""
    seed_operator_data(sqlite)
    state = tmp_path / "state"
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)}
    assert run_cli("idempotency-keys", env=env).returncode == 0  # the history tables exist
    reason = "refused by a trigger of the app: " + "x" * 100_000
    sqlite.execute(
        f"CREATE TRIGGER refuse BEFORE DELETE ON \"RefreshToken\" BEGIN SELECT RAISE(ABORT, '{reason}'); END"
    )
    sqlite.execute(
        "CREATE TRIGGER no_history BEFORE INSERT ON skybot_cleanup_runs BEGIN SELECT RAISE(ABORT, 'no history'); END"
    )
    failed = run_cli("refresh-tokens", env=env)
    assert failed.returncode == 1, failed.stderr
    (entry,) = (state / PENDING_RUNS).glob("*.json")
    written = json.loads(entry.read_text())
    (reported,) = [event["error"] for event in events(failed.stderr, "run_failed")]
    assert reported.endswith(reason)  # the run's own report is whole
    assert written["error"] == f"{reported[:MAX_TEXT_CHARS]}... [{len(reported) - MAX_TEXT_CHARS} characters cut]"
    assert entry.stat().st_size < 64 * 1024

    (earlier,) = EARLIER_PENDING_RUNS
    (state / earlier).mkdir(mode=0o755)
    uncut = state / earlier / "20261101T000000000000-uncut.json"
    uncut.write_text(json.dumps({**written, "run_id": "uncut", "error": reason}))
    uncut.chmod(0o644)
    assert uncut.stat().st_size > 64 * 1024
    sqlite.execute("DROP TRIGGER no_history")
    sqlite.execute("DROP TRIGGER refuse")
    recorded = run_cli("refresh-tokens", env=env)
    assert recorded.returncode == 0, recorded.stderr
    runs = [(row["task"], row["status"], row["error"]) for row in history_rows(sqlite)]
    assert runs == [
        ("idempotency-keys", "ok", None),
        ("refresh-tokens", "failed", reason),  # as the earlier release wrote it
        ("refresh-tokens", "failed", written["error"]),
        ("refresh-tokens", "ok", None),
    ]
    assert sorted(path.name for path in state.rglob("*") if path.is_file()) == []
    assert "spool_entry_quarantined" not in [event["event"] for event in events(recorded.stderr)]


def test_an_earlier_spool_directory_others_could_write_is_left_alone(postgres, tmp_path):
    """0.1.0 made its directory with the umask's mode: under umask 002 the group may write
    it, so its entries cannot be told from forgeries. They wait, neither replayed nor set
    aside (one warning says how to fix it); this release's own records are unaffected."""
    state = tmp_path / "state"
    down = unreachable_run({"SKYBOT_CLEANUP_STATE_DIR": str(state)})
    assert down.returncode == 1
    (entry,) = (state / PENDING_RUNS).glob("*.json")
    (earlier,) = EARLIER_PENDING_RUNS
    (state / earlier).mkdir()
    (state / earlier).chmod(0o775)
    waiting = state / earlier / entry.name.replace(".json", "-earlier.json")
    identity = parse_database_url(postgres.url).identity  # trusted, it would be recorded now
    waiting.write_text(json.dumps({**json.loads(entry.read_text()), "database": identity, "run_id": "earlier"}))
    waiting.chmod(0o644)
    completed = run_cli("refresh-tokens", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)})
    assert completed.returncode == 0, completed.stderr
    (warning,) = events(completed.stderr, "spool_directory_unusable")
    assert warning["directory"] == str(state / earlier)
    assert warning["error"] == "pending-runs is writable by group or others (chmod go-w)"
    assert [path.name for path in (state / earlier).iterdir()] == [waiting.name]
    assert [row["status"] for row in history_rows(postgres)] == ["ok"]


# -- across releases -----------------------------------------------------------------------------


def not_set_aside(state: Path) -> list[str]:
    return sorted(str(path.relative_to(state)) for path in state.rglob("*.bad"))


@pytest.mark.xdist_group("previous-release")
def test_the_previous_releases_spool_entry_is_recorded_after_the_upgrade(postgres, tmp_path, previous_release):
    """0.1.0 could not reach the database and kept its run; the upgrade's first run that
    reaches it records that run, as 0.1.0 wrote it."""
    state = tmp_path / "state"
    old = run_release(previous_release, "magic-links", env=outage(postgres.url, state))
    assert old.returncode == 1, old.stderr
    (earlier,) = EARLIER_PENDING_RUNS
    (entry,) = (state / earlier).glob("*.json")
    assert (stat.S_IMODE(entry.stat().st_mode), stat.S_IMODE((state / earlier).stat().st_mode)) == (0o644, 0o755)
    kept = json.loads(entry.read_text())
    assert "batches" not in kept and len(kept) == 13  # its twelve fields and the database

    upgraded = run_cli("magic-links", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)})
    assert upgraded.returncode == 0, upgraded.stderr
    runs = [(row["run_id"], row["status"], row["exit_code"], row["error_class"]) for row in history_rows(postgres)]
    assert runs[0] == (kept["run_id"], "failed", 1, "OperationalError")
    assert [run[1:] for run in runs[1:]] == [("ok", 0, None)]
    assert not_set_aside(state) == [] and list((state / earlier).iterdir()) == []
    assert "spool_entry_quarantined" not in [event["event"] for event in events(upgraded.stderr)]


@pytest.mark.xdist_group("previous-release")
def test_a_downgrade_leaves_this_releases_entries_for_it(postgres, tmp_path, previous_release):
    """0.1.0 sets aside any entry with a field it does not know. This release keeps its
    entries where 0.1.0 never looks: a downgrade leaves them, and the next upgrade
    records them."""
    state = tmp_path / "state"
    down = run_cli("magic-links", env=outage(postgres.url, state))
    assert down.returncode == 1, down.stderr
    (entry,) = (state / PENDING_RUNS).glob("*.json")
    kept = json.loads(entry.read_text())
    assert "batches" in kept  # a field 0.1.0 does not know

    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_STATE_DIR": str(state)}
    downgraded = run_release(previous_release, "magic-links", env=env)
    assert downgraded.returncode == 0, downgraded.stderr
    assert entry.exists() and not_set_aside(state) == []

    upgraded = run_cli("magic-links", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    runs = [(row["run_id"], row["status"]) for row in history_rows(postgres)]
    assert [status for _, status in runs] == ["ok", "failed", "ok"]
    assert runs[1][0] == kept["run_id"]
    assert not entry.exists() and not_set_aside(state) == []
