"""`demo`: the app's tables seeded and cleaned, without harming anyone's data."""

from __future__ import annotations

import os
import subprocess

import pytest
import sqlalchemy as sa
from helpers import CONSOLE_SCRIPT, run_cli


def test_the_demo_refuses_a_sqlite_file_holding_someone_elses_tables(tmp_path):
    path = tmp_path / "precious.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE invoices (id integer)")
    engine.dispose()
    completed = run_cli("demo", "--path", str(path), env={"SKYBOT_CLEANUP_LOG_FORMAT": "console"})
    assert completed.returncode == 2
    assert completed.stderr == (
        f"skybot-cleanup: error: refusing to replace {path}: it holds tables the demo did not make "
        "(invoices); give a new file\n"
    )
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM sqlite_master").scalars().all() == ["invoices"]
    engine.dispose()


def try_it_line(stdout: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith("Try it yourself: ")]
    return line.removeprefix("Try it yourself: ")


@pytest.mark.parametrize("how", ["as the README runs it", "by absolute path", "on PATH", "python -m"])
def test_the_demo_ends_with_a_command_that_works_as_typed(tmp_path, how):
    """The README's first command runs .venv/bin/skybot-cleanup, which is not on a
    newcomer's PATH: the command the demo suggests must run, as printed, from where the
    demo ran, with that PATH (and a database path with a space in it)."""
    venv_bin = CONSOLE_SCRIPT.parent
    cwd, path = tmp_path, "/usr/bin:/bin"
    if how == "as the README runs it":
        cwd = venv_bin.parent.parent
        command = [os.path.relpath(CONSOLE_SCRIPT, cwd)]
    elif how == "by absolute path":
        command = [str(CONSOLE_SCRIPT)]
    elif how == "on PATH":
        command, path = ["skybot-cleanup"], f"{venv_bin}:/usr/bin:/bin"
    else:
        command = [str(venv_bin / "python"), "-m", "skybot_cleanup"]
    env = {"PATH": path, "HOME": str(tmp_path), "SKYBOT_CLEANUP_LOG_FORMAT": "console"}
    database = tmp_path / "my demo" / "demo.db"
    database.parent.mkdir()
    demo = subprocess.run([*command, "demo", "--path", str(database)], cwd=cwd, env=env, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    suggested = try_it_line(demo.stdout)
    assert suggested.startswith("DATABASE_URL=") and suggested.endswith(" refresh-tokens --dry-run")
    if how == "on PATH":
        assert " skybot-cleanup refresh-tokens" in suggested
    tried = subprocess.run(["/bin/bash", "-c", suggested], cwd=cwd, env=env, capture_output=True, text=True)
    assert tried.returncode == 0, (suggested, tried.stderr)
    assert tried.stdout.startswith("refresh-tokens: would delete 0 rows"), tried.stdout
