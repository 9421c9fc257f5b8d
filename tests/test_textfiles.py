"""node_exporter textfiles: one per job, atomic, and a last success that survives failures (textfiles.py)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import time
from pathlib import Path

import pytest
from components import need_root, world_dir
from helpers import (
    HOUR,
    JOB_NAMES,
    TASK_NAMES,
    advisory_lock_sql,
    events,
    history_rows,
    invoke,
    last_success,
    prom_values,
    put_history,
    run_cli,
    samples,
    seed_operator_data,
)

from skybot_cleanup import textfiles
from skybot_cleanup.clock import epoch


def test_an_invalid_setting_in_the_settings_file_still_writes_the_textfile_pings_and_is_recorded(
    sqlite, tmp_path, monitor
):
    seed_operator_data(sqlite)
    prom = tmp_path / "textfiles"
    prom.mkdir()
    settings_file = tmp_path / "skybot-cleanup.env"
    settings_file.write_text(
        f"DATABASE_URL={sqlite.url}\n"
        f"SKYBOT_CLEANUP_PROM_FILE={prom}\n"
        f"SKYBOT_CLEANUP_PING_URL=http://127.0.0.1:{monitor.server_port}/{{task}}\n"
        f"SKYBOT_CLEANUP_STATE_DIR={tmp_path / 'state-dir'}\n"
        "SKYBOT_CLEANUP_BATCH_SIZE=0\n"
    )
    env = {"SKYBOT_CLEANUP_ENV_FILE": str(settings_file), "SKYBOT_CLEANUP_LOG_FORMAT": "console"}
    completed = run_cli("refresh-tokens", env=env)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and "SKYBOT_CLEANUP_BATCH_SIZE" in completed.stderr
    assert prom_values(prom / "skybot_cleanup_refresh-tokens.prom")["skybot_cleanup_last_exit_code"] == 2
    assert [(method, path.split("?")[0]) for method, path, _ in monitor.requests] == [("POST", "/refresh-tokens/2")]
    # The next good run records it, with its error, before its own.
    settings_file.write_text(settings_file.read_text().replace("BATCH_SIZE=0", "BATCH_SIZE=100"))
    assert run_cli("refresh-tokens", env=env).returncode == 0
    rows = history_rows(sqlite)
    assert [(r["task"], r["status"], r["exit_code"], r["error_class"]) for r in rows] == [
        ("refresh-tokens", "failed", 2, "ConfigError"),
        ("refresh-tokens", "ok", 0, None),
    ]
    assert "SKYBOT_CLEANUP_BATCH_SIZE" in rows[0]["error"]


def test_an_invalid_url_with_a_prom_file_option_writes_that_textfile(tmp_path):
    completed = run_cli(
        "all",
        "--prom-file",
        str(tmp_path),
        env={"DATABASE_URL": "mysql://u@host/app", "SKYBOT_CLEANUP_LOG_FORMAT": "console"},
    )
    assert completed.returncode == 2
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == sorted(
        f"skybot_cleanup_{name}.prom" for name in JOB_NAMES if name != "metrics"
    )
    assert {prom_values(p)["skybot_cleanup_last_exit_code"] for p in tmp_path.glob("*.prom")} == {2}
    assert "skybot_cleanup_last_success_timestamp_seconds" not in prom_values(
        tmp_path / "skybot_cleanup_refresh-tokens.prom"
    )


def test_metrics_textfile_parses_back(backend, tmp_path):
    seed_operator_data(backend)
    path = tmp_path / "textfile" / "skybot_cleanup.prom"
    path.parent.mkdir()
    result = invoke("metrics", "--prom-file", str(path), env={"DATABASE_URL": backend.url})
    assert result.exit_code == 0, result.output
    text = path.read_text()
    found = samples(text)
    assert found[("skybot_cleanup_active_sessions", ())] == 2
    assert found[("skybot_cleanup_due_rows", (("task", "refresh-tokens"),))] == 2
    assert found[("skybot_cleanup_due_rows", (("task", "magic-links"),))] == 2
    assert found[("skybot_cleanup_task_overdue", (("task", "revoked-tokens"),))] == 0
    assert found[("skybot_cleanup_table_rows", (("table", "MagicLink"),))] == 3
    assert abs(found[("skybot_cleanup_snapshot_timestamp_seconds", ())] - time.time()) < 60
    # No timestamps on samples (node_exporter rejects them), no temporary file left, and
    # readable by node_exporter's user whatever the umask.
    assert all(len(line.split()) == 2 for line in text.splitlines() if not line.startswith("#"))
    assert [p.name for p in path.parent.iterdir()] == ["skybot_cleanup.prom"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_cleanup_run_writes_its_textfile(sqlite, tmp_path):
    seed_operator_data(sqlite)
    result = invoke("all", "--prom-file", str(tmp_path), env={"DATABASE_URL": sqlite.url})
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == sorted(f"skybot_cleanup_{t}.prom" for t in TASK_NAMES)
    path = tmp_path / "skybot_cleanup_refresh-tokens.prom"
    found = {name: value for (name, _labels), value in samples(path.read_text()).items()}
    assert found["skybot_cleanup_last_rows"] == 2
    assert found["skybot_cleanup_last_exit_code"] == 0
    assert abs(found["skybot_cleanup_last_success_timestamp_seconds"] - time.time()) < 60
    assert found["skybot_cleanup_schedule_interval_seconds"] == 3600
    assert 0 < found["skybot_cleanup_next_run_timestamp_seconds"] - time.time() <= 3600
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_single_path_prom_file_keeps_one_file_per_task(sqlite, tmp_path):
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path / "skybot.prom")}
    assert invoke("refresh-tokens", env=env).exit_code == 0
    assert invoke("magic-links", env=env).exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == ["skybot_magic-links.prom", "skybot_refresh-tokens.prom"]


def test_the_last_success_survives_failures_outages_dry_runs_and_bad_settings(sqlite, tmp_path):
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    path = tmp_path / "skybot_cleanup_magic-links.prom"
    assert invoke("magic-links", env=env).exit_code == 0
    succeeded = last_success(path)
    assert succeeded is not None
    os.umask(0o077)
    try:
        failed = invoke("magic-links", env={**env, "SKYBOT_CLEANUP_MAGIC_LINK_USED_COLUMN": "nope"})
        unreachable = run_cli(
            "magic-links",
            env={**env, "DATABASE_URL": "postgresql://u@127.0.0.1:1/x", "SKYBOT_CLEANUP_MAX_RETRIES": "0"},
        )
        dry = invoke("magic-links", "--dry-run", env=env)
        misconfigured = run_cli("magic-links", env={**env, "SKYBOT_CLEANUP_BATCH_SIZE": "0"})
    finally:
        os.umask(0o022)
    assert (failed.exit_code, unreachable.returncode, dry.exit_code, misconfigured.returncode) == (2, 1, 0, 2)
    assert last_success(path) == succeeded
    found = {name: value for (name, _), value in samples(path.read_text()).items()}
    assert found["skybot_cleanup_last_exit_code"] == 2  # the invalid setting, the newest outcome
    assert abs(found["skybot_cleanup_last_run_timestamp_seconds"] - time.time()) < 60
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_metrics_and_runs_share_the_prom_file_directory_without_sharing_a_series(sqlite, tmp_path):
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    assert invoke("metrics", env=env).exit_code == 0
    assert invoke("refresh-tokens", env=env).exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("*.prom")) == [
        "skybot_cleanup_metrics.prom",  # the metrics job's run series
        "skybot_cleanup_refresh-tokens.prom",
        "skybot_cleanup_snapshot.prom",  # the metrics job's snapshot
    ]
    series = [set(samples(p.read_text())) for p in sorted(tmp_path.glob("*.prom"))]
    assert not (series[0] & series[1]) and not (series[0] & series[2]) and not (series[1] & series[2])
    assert ("skybot_cleanup_last_exit_code", (("task", "metrics"),)) in series[0]


def failed_run(tmp_path, prom: Path):
    """A run that fails (its database is down), so it reads the previous textfile for the
    last success it must keep."""
    return run_cli(
        "refresh-tokens",
        env={
            "DATABASE_URL": "postgresql://skybot@127.0.0.1:1/app",
            "SKYBOT_CLEANUP_MAX_RETRIES": "0",
            "SKYBOT_CLEANUP_PROM_FILE": str(prom),
            "SKYBOT_CLEANUP_STATE_DIR": str(tmp_path / "state"),
        },
        timeout=60,
    )


def test_a_failed_run_never_reads_the_previous_textfile_through_a_link(tmp_path):
    """A root-only file with a value in the textfile's format, linked at the path: its
    value must not be copied into the world-readable textfile."""
    secret = tmp_path / "root-only.prom"
    secret.write_text('skybot_cleanup_last_success_timestamp_seconds{task="refresh-tokens"} 4242424242.0\n')
    secret.chmod(0o600)
    prom = tmp_path / "prom"
    prom.mkdir()
    (prom / "skybot_cleanup_refresh-tokens.prom").symlink_to(secret)
    completed = failed_run(tmp_path, prom)
    assert completed.returncode == 1
    written = prom / "skybot_cleanup_refresh-tokens.prom"
    assert written.is_file() and not written.is_symlink()
    # Compared as parsed values: Prometheus writes 4242424242.0 as 4.242424242e+09. The
    # failed run knows no earlier success, so the file must hold none.
    assert 4242424242.0 not in samples(written.read_text()).values()
    assert last_success(written) is None
    assert secret.read_text().startswith("skybot_cleanup_last_success")  # untouched


@pytest.mark.parametrize("special", ["fifo", "/dev/zero link"])
def test_a_special_file_at_the_textfile_path_never_hangs_or_floods_a_run(tmp_path, special):
    prom = tmp_path / "prom"
    prom.mkdir()
    path = prom / "skybot_cleanup_refresh-tokens.prom"
    if special == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    completed = failed_run(tmp_path, prom)  # a read of either would block or never end
    assert completed.returncode == 1
    assert path.is_file() and not path.is_symlink() and "skybot_cleanup_last_exit_code" in path.read_text()


def test_a_textfile_that_cannot_be_written_is_a_warning_and_the_run_stands(sqlite, tmp_path):
    seed_operator_data(sqlite)
    missing = tmp_path / "no-such-directory" / "x.prom"
    completed = run_cli(
        "refresh-tokens", "--json", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(missing)}
    )
    assert completed.returncode == 0, completed.stderr
    warning = next(event for event in events(completed.stderr) if event["event"] == "textfile_not_written")
    assert warning["path"].endswith("x_refresh-tokens.prom") and warning["level"] == "warning"


def test_a_textfile_is_replaced_whole_never_rewritten_in_place(sqlite, tmp_path):
    """node_exporter may read it at any moment: a link planted at its path is replaced,
    not written through, and a write that fails (a full disk) leaves the old file whole."""
    seed_operator_data(sqlite)
    env = {"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    textfile = tmp_path / "skybot_cleanup_refresh-tokens.prom"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    textfile.symlink_to(victim)
    assert run_cli("refresh-tokens", env=env).returncode == 0
    assert victim.read_text() == "precious\n" and not textfile.is_symlink()
    before = textfile.read_text()
    assert prom_values(textfile)["skybot_cleanup_last_exit_code"] == 0
    failed = run_cli("refresh-tokens", env=env, file_size_limit=64)
    assert failed.returncode == 0, failed.stderr  # the run's result stands
    assert [e["event"] for e in events(failed.stderr, "textfile_not_written")] == ["textfile_not_written"]
    assert textfile.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".db" and p.name != "state") == [
        textfile.name,
        "victim",
    ]


@pytest.mark.parametrize("planted", ["another user's link", "a link others could replace"])
def test_a_root_run_never_writes_textfiles_through_a_link_someone_else_controls(sqlite, tmp_path, planted):
    """The textfile directory named through a link in a directory others can write: root
    must not write its files wherever an unprivileged user points that link. The run's
    result stands; the textfile is a warning."""
    need_root()
    seed_operator_data(sqlite)
    target = tmp_path / "root-only"
    target.mkdir(mode=0o700)
    theirs = world_dir("skybot-prom-")
    link = theirs / "textfiles"
    link.symlink_to(target)
    if planted == "another user's link":
        theirs.chmod(0o1777)  # sticky, as /tmp is: only the link's owner is wrong
        os.lchown(link, pwd.getpwnam("nobody").pw_uid, -1)
        why = "owned by uid"
    else:
        why = "in a directory other users can change"  # root's own link, but anyone may replace it
    try:
        for command in ("refresh-tokens", "metrics"):
            completed = run_cli(command, env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": f"{link}/"})
            assert list(target.iterdir()) == [], command
            if command == "refresh-tokens":
                assert completed.returncode == 0, completed.stderr
                (warning,) = events(completed.stderr, "textfile_not_written")
                assert f"is reached through a link (textfiles) {why}" in warning["error"]
            else:
                assert completed.returncode == 1  # the snapshot was not delivered
                assert (
                    f"is reached through a link (textfiles) {why}" in events(completed.stderr, "run_failed")[0]["error"]
                )
    finally:
        shutil.rmtree(theirs)
    assert sqlite.ids("RefreshToken") == {"live_1", "live_2", "revoked_live", "revoked_100d"}


def test_a_textfile_directory_reached_through_the_users_own_link_is_used(sqlite, tmp_path):
    seed_operator_data(sqlite)
    (tmp_path / "real").mkdir()
    (tmp_path / "current").symlink_to("real")
    completed = run_cli(
        "refresh-tokens", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path / "current")}
    )
    assert completed.returncode == 0, completed.stderr
    assert [path.name for path in (tmp_path / "real").iterdir()] == ["skybot_cleanup_refresh-tokens.prom"]


def trickle(handler):
    """A Pushgateway that answers its status line and then one header byte a second: a
    socket timeout never fires (once, a push was held 124 s)."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(120):  # 2 minutes at most, whatever the client does
        if handler.server.released.wait(1.0):
            return
        handler.wfile.write(b"x")
        handler.wfile.flush()
        handler.server.sent += 1


def test_a_trickling_pushgateway_holds_metrics_no_longer_than_its_deadline(sqlite, monitor, monkeypatch):
    seed_operator_data(sqlite)
    monkeypatch.setattr(textfiles, "PUSH_TIMEOUT_S", 2.0)
    monitor.reply = trickle
    result = invoke(
        "metrics", "--pushgateway", f"http://127.0.0.1:{monitor.server_port}", env={"DATABASE_URL": sqlite.url}
    )
    assert result.exit_code == 1
    (failed,) = events(result.stderr, "run_failed")
    assert failed["error"] == "metrics were collected but not delivered: TimeoutError: no complete reply within 2.0 s"
    assert [request[:2] for request in monitor.requests] == [("PUT", "/metrics/job/skybot_cleanup")]


@pytest.mark.parametrize("target", ["ftp://127.0.0.1:1/metrics", "file:///etc/passwd"])
def test_a_push_redirected_away_from_http_is_not_followed(sqlite, monitor, target):
    seed_operator_data(sqlite)

    def redirect(handler):
        handler.send_response(307)
        handler.send_header("Location", target)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    monitor.reply = redirect
    result = invoke(
        "metrics", "--pushgateway", f"http://127.0.0.1:{monitor.server_port}", env={"DATABASE_URL": sqlite.url}
    )
    assert result.exit_code == 1
    (failed,) = events(result.stderr, "run_failed")
    scheme = target.partition(":")[0]
    assert failed["error"] == (
        "metrics were collected but not delivered: RedirectRefused: "
        f"redirected to {scheme}://, which is not followed (only http:// and https:// are)"
    )


def test_a_skipped_first_run_writes_the_last_success_the_history_holds(postgres, tmp_path):
    """A host with no textfile yet (a new node, a wiped directory) whose first run is
    skipped: the last success comes from the history, read as the run was recorded."""
    put_history(postgres, ("refresh-tokens", "ok", 2 * HOUR))
    recorded = next(row["finished_at"] for row in history_rows(postgres) if row["task"] == "refresh-tokens")
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_PROM_FILE": str(tmp_path)}
    with postgres.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql(advisory_lock_sql("refresh-tokens"))
        skipped = run_cli("refresh-tokens", env=env)
    assert skipped.returncode == 75, skipped.stderr
    path = tmp_path / "skybot_cleanup_refresh-tokens.prom"
    assert last_success(path) == pytest.approx(epoch(recorded), abs=0.001)
    assert prom_values(path)["skybot_cleanup_last_exit_code"] == 75
