"""`demo`: the app's tables seeded and cleaned, without harming anyone's data."""

from __future__ import annotations

import sqlalchemy as sa
from helpers import run_cli


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
