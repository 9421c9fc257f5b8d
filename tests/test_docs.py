"""The docs are generated from the registry; these fail when they drift."""

from pathlib import Path

from skybot_cleanup.generate.readme import render
from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.settings import Settings, env_name

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_generated_sections_match_registry_and_settings():
    text = README.read_text()
    assert render(text) == text, "README is stale: run python -m skybot_cleanup.generate.readme"


def test_readme_names_every_job_setting_and_timer():
    text = README.read_text()
    for job in REGISTRY.jobs:
        assert f"| `{job.name}` |" in text
        assert f"skybot-cleanup-{job.name}.timer" in text
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in text


def test_readme_says_what_the_tool_is_then_gives_the_two_quick_start_commands():
    lines = README.read_text().splitlines()
    start = lines.index("```bash")
    assert 2 <= start <= 12, "the two commands belong on the first screen"
    assert "the people who operate it" in " ".join(lines[:start])
    assert lines[start + 1 : start + 4] == [
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/skybot-cleanup demo",
        ".venv/bin/python -m pytest",
        "```",
    ]
