"""The docs: generated from the registry where they can be (these fail when they drift),
an entry page that stays short, and links that lead somewhere."""

import re
from pathlib import Path

import pytest

from skybot_cleanup.generate.readme import PAGES, SECTIONS, marked, render
from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_CHARS = 20_000
# [text](target): a link, or an image with a leading "!"; code spans are left out first.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def text_of(page: str) -> str:
    return (ROOT / page).read_text()


@pytest.mark.parametrize("page", sorted(PAGES))
def test_generated_sections_match_registry_and_settings(page):
    text = text_of(page)
    assert marked(text) == set(PAGES[page]), f"{page} should carry exactly the sections {PAGES[page]}"
    assert render(text, SECTIONS) == text, f"{page} is stale: run python -m skybot_cleanup.generate.readme"


def test_no_other_page_has_generated_sections():
    """A page marked but not in PAGES would never be regenerated."""
    for path in [README, *DOCS]:
        page = str(path.relative_to(ROOT))
        if page not in PAGES:
            assert not marked(path.read_text()), f"{page} has generated sections: add it to generate.readme.PAGES"


def test_docs_name_every_job_setting_and_timer():
    readme, configuration, deployment = (text_of(page) for page in PAGES)
    for job in REGISTRY.jobs:
        assert f"| `{job.name}` |" in readme
        assert f"skybot-cleanup-{job.name}.timer" in deployment
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in configuration


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


def test_readme_is_an_entry_page_that_links_every_docs_page():
    text = README.read_text()
    assert len(text) <= README_MAX_CHARS, f"README.md is {len(text)} characters: move detail to docs/"
    linked = {target.split("#")[0] for target in LINK.findall(CODE.sub("", text))}
    assert DOCS
    for path in DOCS:
        assert f"docs/{path.name}" in linked, f"README.md does not link docs/{path.name}"


# Reports written as documents of their own, not split out of the README.
REPORTS = ("benchmarks.md", "scaling.md")


@pytest.mark.parametrize("path", [path for path in DOCS if path.name not in REPORTS], ids=lambda path: path.name)
def test_each_docs_page_says_what_it_holds_and_links_back_to_the_readme(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and not lines[1]
    opening = " ".join(lines[2 : lines.index("", 2)])
    assert "[README](../README.md)" in opening, f"{path.name}: its opening paragraph links back to the README"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a page's headings (outside code blocks)."""
    found = set()
    for line in re.sub(r"```.*?```", "", path.read_text(), flags=re.S).splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().lower().replace("`", "")
            found.add(re.sub(r"[^\w\- ]", "", heading).replace(" ", "-"))
    return found


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_and_anchor_exists(path):
    for target in LINK.findall(CODE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.name}: {target}: no such heading"
