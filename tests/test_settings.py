"""Settings: environment, settings file, options, the app's own variables, and `config`."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from components import need_root, world_dir
from helpers import HOUR, PASSWORD, error_line, events, invoke, os_user_group, run_cli, seed_tokens, with_password

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import insert_rows, refresh_token_row
from skybot_cleanup.settings import load


@pytest.mark.parametrize(
    ("variable", "value"), [("SKYBOT_CLEANUP_LOG_LEVEL", "DEBUG"), ("SKYBOT_CLEANUP_LOG_FORMAT", "JSON")]
)
def test_enumerated_settings_ignore_case(sqlite, variable, value):
    result = invoke("refresh-tokens", env={"DATABASE_URL": sqlite.url, variable: value})
    assert result.exit_code == 0, result.output


def test_renamed_tables_and_columns_are_settings(backend):
    renamed = {
        "SKYBOT_CLEANUP_REFRESH_TOKEN_TABLE": "refresh_tokens",
        "SKYBOT_CLEANUP_REFRESH_TOKEN_EXPIRES_AT_COLUMN": "expires_at",
        "SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN": "revoked_at",
    }
    settings = load({k.removeprefix("SKYBOT_CLEANUP_").lower(): v for k, v in renamed.items()}).settings
    metadata = app_metadata(settings)
    table = metadata.tables["refresh_tokens"]
    table.create(backend.engine)
    now = utc_now()
    rows = [
        {**refresh_token_row(id_, now + shift), "expires_at": now + shift, "revoked_at": None}
        for id_, shift in (("old", -HOUR), ("new", HOUR))
    ]
    with backend.engine.begin() as conn:
        insert_rows(
            conn,
            metadata,
            {"refresh_tokens": [{k: v for k, v in row.items() if k not in ("expiresAt", "revokedAt")} for row in rows]},
        )
    result = invoke("refresh-tokens", "--json", env={"DATABASE_URL": backend.url, **renamed})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 1
    with backend.engine.connect() as conn:
        assert set(conn.scalars(sa.select(table.c.id))) == {"new"}


def test_env_file_with_the_apps_other_variables(backend, tmp_path):
    seed_tokens(backend)
    (tmp_path / ".env").write_text(
        f'NODE_ENV=production\nJWT_SECRET=abc\nPORT=3000\nDATABASE_URL="{backend.url}"\n'
        "JOB_MAX_RETRIES=3\nSKYBOT_CLEANUP_LOG_FORMAT=json\n"
        'PRIVATE_KEY="-----BEGIN KEY-----\nMIIB\n-----END KEY-----"\n'
    )
    result = invoke("refresh-tokens", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 2


def test_option_overrides_environment(backend):
    seed_tokens(backend)
    result = invoke(
        "refresh-tokens",
        "--json",
        "--database-url",
        backend.url,
        env={"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none"},
    )
    assert result.exit_code == 0, result.output


def test_missing_env_file_is_a_configuration_error(tmp_path):
    result = invoke("refresh-tokens", env={"SKYBOT_CLEANUP_ENV_FILE": str(tmp_path / "nope.env")})
    assert result.exit_code == 2
    assert error_line(result.stderr) == (
        f"SKYBOT_CLEANUP_ENV_FILE names {tmp_path / 'nope.env'}, which is not a readable file"
    )


def test_malformed_named_env_file_is_a_configuration_error(tmp_path):
    path = tmp_path / "env"
    path.write_text("DATABASE_URL=sqlite:///x.db\nthis is not an assignment\n")
    result = invoke("refresh-tokens", env={"SKYBOT_CLEANUP_ENV_FILE": str(path)})
    assert result.exit_code == 2
    assert error_line(result.stderr) == f"settings file {path}, line 2: expected KEY=value"


def test_env_file_values_are_literal(backend, tmp_path):
    """No interpolation, no quoting rules; CRLF, a BOM and `export` are tolerated. (In a
    URL, "#" is percent-encoded: unencoded, it is refused, test_urls.py.)"""
    seed_tokens(backend)
    secret = "pa$word${HOME}x&y%z#1"
    in_url = secret.replace("#", "%23")
    url = backend.url if backend.kind == "sqlite" else with_password(backend.url, in_url)
    path = tmp_path / "env"
    path.write_bytes(
        (
            "\ufeff# settings\r\nexport DATABASE_URL=" + url + "\r\n"
            f"SKYBOT_CLEANUP_PING_URL=https://hc-ping.example/{secret}\r\n"
        ).encode()
    )
    settings = load(environ={"SKYBOT_CLEANUP_ENV_FILE": str(path), "HOME": "/root"}).settings
    assert settings.database_url is not None and settings.database_url.get_secret_value() == url
    assert settings.ping_url is not None and settings.ping_url.get_secret_value().endswith(secret)
    result = invoke("refresh-tokens", "--json", env={"SKYBOT_CLEANUP_ENV_FILE": str(path)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 2
    assert secret not in result.output and in_url not in result.output


def test_unknown_setting_is_a_warning_naming_the_closest(sqlite):
    result = invoke("revoked-tokens", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_REVOKED_RETENTION": "180"})
    assert result.exit_code == 0
    (warning,) = [event for event in events(result.stderr) if event["event"] == "unknown_setting"]
    assert warning == {
        **warning,
        "variable": "SKYBOT_CLEANUP_REVOKED_RETENTION",
        "level": "warning",
        "hint": "did you mean SKYBOT_CLEANUP_REVOKED_RETENTION_DAYS?",
    }


def test_our_retry_settings_win_over_the_apps(monkeypatch):
    monkeypatch.setenv("JOB_MAX_RETRIES", "7")
    monkeypatch.setenv("JOB_RETRY_DELAY", "100")
    assert (load().settings.max_retries, load().settings.retry_delay_ms) == (7, 100)
    monkeypatch.setenv("SKYBOT_CLEANUP_MAX_RETRIES", "1")
    monkeypatch.setenv("SKYBOT_CLEANUP_RETRY_DELAY_MS", "20")
    assert (load().settings.max_retries, load().settings.retry_delay_ms) == (1, 20)


def test_config_shows_every_setting_its_source_and_no_secret(tmp_path):
    path = tmp_path / "env"
    path.write_text(f"SKYBOT_CLEANUP_BATCH_SIZE=500\nSKYBOT_CLEANUP_PING_URL=https://hc-ping.com/{PASSWORD}/x\n")
    result = invoke(
        "config",
        "--json",
        env={
            "SKYBOT_CLEANUP_ENV_FILE": str(path),
            "JOB_MAX_RETRIES": "4",
            "SKYBOT_CLEANUP_SLEEP_MS": "5",
            "DATABASE_URL": f"postgres://app:{PASSWORD}@db.internal:5432/skybot?schema=public",
            "SKYBOT_CLEANUP_BATCH_SIZ": "1",
        },
    )
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    settings = {entry["variable"]: entry for entry in view["settings"]}
    assert settings["SKYBOT_CLEANUP_DATABASE_URL"] == {
        "variable": "SKYBOT_CLEANUP_DATABASE_URL",
        "source": "environment (DATABASE_URL, the app's variable)",
        "value": "postgresql://app:***@db.internal:5432/skybot",
    }
    assert (settings["SKYBOT_CLEANUP_BATCH_SIZE"]["value"], settings["SKYBOT_CLEANUP_BATCH_SIZE"]["source"]) == (
        500,
        "settings file (SKYBOT_CLEANUP_BATCH_SIZE)",
    )
    assert settings["SKYBOT_CLEANUP_MAX_RETRIES"]["source"] == "environment (JOB_MAX_RETRIES, the app's variable)"
    assert settings["SKYBOT_CLEANUP_SLEEP_MS"]["source"] == "environment (SKYBOT_CLEANUP_SLEEP_MS)"
    assert settings["SKYBOT_CLEANUP_LOCK_TIMEOUT_MS"] == {
        "variable": "SKYBOT_CLEANUP_LOCK_TIMEOUT_MS",
        "value": 5000,
        "source": "default",
    }
    assert settings["SKYBOT_CLEANUP_PING_URL"]["value"] == "***"
    assert view["unknown"] == [{"variable": "SKYBOT_CLEANUP_BATCH_SIZ", "closest": "SKYBOT_CLEANUP_BATCH_SIZE"}]
    assert view["settings_file"] == str(path)
    assert PASSWORD not in result.output
    table = invoke("config", env={"DATABASE_URL": f"postgres://app:{PASSWORD}@db/x"})
    assert "postgresql://app:***@db/x" in table.stdout and PASSWORD not in table.output


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


def secret_volume(root: Path, files: dict[str, str], mode: int = 0o644) -> Path:
    """A Kubernetes secret volume as the kubelet writes it: the files in a timestamped
    directory, `..data` a link to it, each key a link through `..data`, in a sticky
    directory anyone may write (the volume's tmpfs); everything this user's."""
    root.mkdir()
    root.chmod(0o1777)
    data = root / "..2026_12_01_00_00_00.000000001"
    data.mkdir(mode=0o755)
    for name, text in files.items():
        (data / name).write_text(text)
        (data / name).chmod(mode)
        (root / name).symlink_to(f"..data/{name}")
    (root / "..data").symlink_to(data.name)
    return root


def test_the_database_url_from_a_secret_file_as_docker_and_kubernetes_mount_it(backend, tmp_path):
    """DATABASE_URL_FILE and --database-url-file: the URL is in neither the process list
    nor the environment. Kubernetes mounts a secret as links into the volume's data."""
    seed_tokens(backend)
    volume = secret_volume(tmp_path / "secrets", {"database-url": f"\n{backend.url}\nsecond line\n"}, mode=0o600)
    by_variable = run_cli("refresh-tokens", "--json", env={"DATABASE_URL_FILE": str(volume / "database-url")})
    assert by_variable.returncode == 0, by_variable.stderr
    assert json.loads(by_variable.stdout)["rows"] == 2
    assert events(by_variable.stderr, "secret_file_readable") == []
    backend.insert("RefreshToken", [refresh_token_row("expired_3", utc_now() - HOUR)])
    by_option = run_cli(
        "refresh-tokens",
        "--json",
        "--database-url-file",
        str(volume / "database-url"),
        env={"DATABASE_URL": "postgres://nobody@127.0.0.1:1/none"},
    )
    assert by_option.returncode == 0, by_option.stderr
    assert json.loads(by_option.stdout)["rows"] == 1
    assert backend.ids("RefreshToken") == {"live", "revoked_expired"}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_url_file_others_may_read_is_a_warning_once(sqlite, tmp_path, mode):
    """As libpq says of a ~/.pgpass that group or others may read (Kubernetes' default
    mode for a secret is 0644)."""
    volume = secret_volume(tmp_path / "secrets", {"database-url": sqlite.url, "ping-url": "http://127.0.0.1:1/x"}, mode)
    path = str(volume / "database-url")
    completed = run_cli(
        "all", "--dry-run", env={"DATABASE_URL_FILE": path, "SKYBOT_CLEANUP_PING_URL_FILE": str(volume / "ping-url")}
    )
    assert completed.returncode == 0, completed.stderr
    warned = [(event["path"], event["error"]) for event in events(completed.stderr, "secret_file_readable")]
    assert warned == [
        (path, f"DATABASE_URL_FILE {path} has mode {mode:04o}: group or others may read it"),
        (
            str(volume / "ping-url"),
            f"SKYBOT_CLEANUP_PING_URL_FILE {volume / 'ping-url'} has mode {mode:04o}: group or others may read it",
        ),
    ]


def nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


@pytest.mark.parametrize("planted", ["another user's link", "a link others could replace", "a link to their file"])
def test_a_url_file_reached_through_a_link_someone_else_controls_is_never_read(tmp_path, planted):
    """Root, pointed at a path in a directory other users can write: a link there is
    followed only if it is root's and no one else can swap it, and only to root's file."""
    need_root()
    secret = tmp_path / "root-only"
    secret.write_text(f"postgresql://app:{PASSWORD}@db.internal/skybot\n")
    secret.chmod(0o600)
    theirs = world_dir("skybot-url-")
    link = theirs / "database-url"
    if planted == "another user's link":
        theirs.chmod(0o1777)  # sticky, as /tmp is: only the link's owner is wrong
        link.symlink_to(secret)
        os.lchown(link, nobody(), -1)
        why = f"is reached through a link (database-url) owned by uid {nobody()}, not by this user or root"
    elif planted == "a link others could replace":
        link.symlink_to(secret)  # root's own link, in a directory anyone may change
        why = "is reached through a link (database-url) in a directory other users can change"
    else:
        theirs.chmod(0o1777)
        (theirs / "url").write_text(f"postgresql://app:{PASSWORD}@db.internal/skybot\n")
        os.chown(theirs / "url", nobody(), -1)
        link.symlink_to(theirs / "url")
        why = f"is a link to a file of uid {nobody()}, not of this user or root"
    try:
        completed = run_cli(
            "refresh-tokens", env={"DATABASE_URL_FILE": str(link), "SKYBOT_CLEANUP_LOG_FORMAT": "console"}
        )
    finally:
        shutil.rmtree(theirs)
    running_as = pwd.getpwuid(os.geteuid()).pw_name
    assert (completed.returncode, completed.stdout) == (2, "")
    assert completed.stderr == (
        f"skybot-cleanup: error: cannot read DATABASE_URL_FILE {link}: {link} {why} (running as {running_as})\n"
    )


PLANTED = "planted-Secret-4242"


@pytest.mark.parametrize("pointed_at", ["an env file", "a one-line env file", "/proc/self/environ"])
def test_a_url_file_that_is_not_one_shows_nothing_of_what_it_holds(tmp_path, pointed_at):
    """The wrong file named as the URL file: whatever it holds (a planted password, the
    environment), no command shows any of it, and each fails in one line."""
    if pointed_at == "/proc/self/environ":
        path = "/proc/self/environ"
    else:
        lines = [f"PGPASSWORD={PLANTED}", f"DATABASE_URL=postgres://app:{PLANTED}@db.internal/app"]
        path = str(tmp_path / "app.env")
        Path(path).write_text(("\n" if pointed_at == "an env file" else " ").join(lines) + "\n")
        Path(path).chmod(0o600)
    env = {"DATABASE_URL_FILE": path, "PGPASSWORD": PLANTED, "SKYBOT_CLEANUP_LOG_FORMAT": "console"}
    for command in ("refresh-tokens", "check", "status", "history", "metrics", "config"):
        completed = run_cli(command, env=env)
        shown = completed.stdout + completed.stderr
        # Not even lowercased: the scheme was once quoted that way.
        assert all(word not in shown.lower() for word in (PLANTED.lower(), "db.internal", "pgpassword")), shown
        if command != "config" or pointed_at == "/proc/self/environ":
            assert completed.returncode == 2, (command, shown)
            assert completed.stderr.splitlines()[-1].startswith("skybot-cleanup: "), (command, shown)


def test_config_shows_only_the_first_line_of_the_url_file(tmp_path):
    secret = tmp_path / "database-url"
    secret.write_text(f"postgresql://app@db.internal/skybot\nPGPASSWORD={PLANTED}\n")
    completed = run_cli("config", env={"DATABASE_URL_FILE": str(secret)})
    assert completed.returncode == 0, completed.stderr
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("SKYBOT_CLEANUP_DATABASE_URL ")]
    assert line.split() == [
        "SKYBOT_CLEANUP_DATABASE_URL",
        "postgresql://app@db.internal/skybot",
        "environment",
        "(DATABASE_URL_FILE)",
    ]
    assert PLANTED not in completed.stdout + completed.stderr


def test_config_names_the_secret_file_and_never_shows_what_it_holds(tmp_path):
    secret = tmp_path / "database-url"
    secret.write_text(f"postgres://app:{PASSWORD}@db.internal/skybot\n")
    for args, env, source in (
        ((), {"DATABASE_URL_FILE": str(secret)}, "environment (DATABASE_URL_FILE)"),
        ((), {"SKYBOT_CLEANUP_DATABASE_URL_FILE": str(secret)}, "environment (SKYBOT_CLEANUP_DATABASE_URL_FILE)"),
        (("--database-url-file", str(secret)), {"DATABASE_URL": "sqlite://"}, "option (--database-url-file)"),
    ):
        completed = run_cli("config", "--json", *args, env=env)
        assert completed.returncode == 0, completed.stderr
        view = json.loads(completed.stdout)
        entry = next(e for e in view["settings"] if e["variable"] == "SKYBOT_CLEANUP_DATABASE_URL")
        assert (entry["value"], entry["source"]) == ("postgresql://app:***@db.internal/skybot", source)
        assert view["unknown"] == []
        assert PASSWORD not in completed.stdout + completed.stderr


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot read DATABASE_URL_FILE {path}: No such file or directory"),
        ("\n", "DATABASE_URL_FILE {path} is empty"),
    ],
)
def test_a_missing_or_empty_secret_file_is_one_line_and_exit_2(tmp_path, content, why):
    path = tmp_path / "database-url"
    if content is not None:
        path.write_text(content)
    completed = run_cli("refresh-tokens", env={"DATABASE_URL_FILE": str(path), "SKYBOT_CLEANUP_LOG_FORMAT": "console"})
    assert completed.returncode == 2
    assert completed.stderr.startswith(f"skybot-cleanup: error: {why.format(path=path)}")
    assert len(completed.stderr.splitlines()) == 1


def test_a_fifo_as_the_secret_file_does_not_hang(tmp_path):
    import os

    fifo = tmp_path / "database-url"
    os.mkfifo(fifo)
    completed = run_cli(
        "check", env={"DATABASE_URL_FILE": str(fifo), "SKYBOT_CLEANUP_LOG_FORMAT": "console"}, timeout=60
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith(
        f"skybot-cleanup: error: cannot read DATABASE_URL_FILE {fifo}: {fifo} is not a regular file"
    )


@pytest.mark.parametrize("variable", ["SKYBOT_CLEANUP_PROM_FILE", "SKYBOT_CLEANUP_STATE_DIR"])
@pytest.mark.parametrize("bad", ["\x00", "\x1b[2J", "\t"])
def test_a_path_setting_with_nul_or_a_control_character_fails_at_load(sqlite, tmp_path, variable, bad):
    """Caught before anything runs (a NUL once failed after the deletion, unrecorded)."""
    seed_tokens(sqlite)
    settings = tmp_path / "env"
    settings.write_text(f'{variable}="{tmp_path}/a{bad}b"\n')
    completed = run_cli(
        "refresh-tokens",
        env={
            "DATABASE_URL": sqlite.url,
            "SKYBOT_CLEANUP_ENV_FILE": str(settings),
            "SKYBOT_CLEANUP_LOG_FORMAT": "console",
        },
    )
    assert (completed.returncode, completed.stderr) == (
        2,
        f"skybot-cleanup: error: invalid setting {variable}: must be a path, without NUL or other control characters\n",
    )
    assert sqlite.ids("RefreshToken") == {"expired_1", "expired_2", "live", "revoked_expired"}
