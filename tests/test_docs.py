"""The docs are generated from the registry; these fail when they drift."""

from pathlib import Path

from skybot_cleanup.docs import render
from skybot_cleanup.settings import Settings, env_name
from skybot_cleanup.tasks import TASKS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_match_registry_and_settings():
    text = README.read_text()
    assert render(text) == text, "README is stale: run python -m skybot_cleanup.docs"


def test_readme_names_every_task_and_setting():
    text = README.read_text()
    for task in TASKS:
        assert f"| `{task.name}` | `{task.schedule}` |" in text
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in text


def test_readme_opens_with_the_two_quick_start_commands():
    lines = README.read_text().splitlines()
    assert lines[2:6] == [
        "```bash",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/skybot-cleanup demo",
        ".venv/bin/python -m pytest",
        "```",
    ]
