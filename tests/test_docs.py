"""The docs: generated from the code where they can be (these fail when they drift),
checked against it elsewhere, an entry page that stays short, links that lead
somewhere, and a changelog whose newest version is the package's."""

import ast
import io
import json
import re
import signal
import tokenize
from pathlib import Path

import pytest
import yaml
from helpers import DEPLOY, run_cli

from skybot_cleanup import __version__
from skybot_cleanup.errors import EXIT_SIGNAL_BASE, ExitCode
from skybot_cleanup.generate.deploy import FORMATS
from skybot_cleanup.generate.docs import PAGES, SECTIONS, marked, render_sections
from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.settings import DefaultSettings, env_name

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PACKAGE = ROOT / "skybot_cleanup"
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
    assert render_sections(text, SECTIONS) == text, f"{page} is stale: run python -m skybot_cleanup.generate.docs"


def test_no_other_page_has_generated_sections():
    """A page marked but not in PAGES would never be regenerated."""
    for path in [README, *DOCS]:
        page = str(path.relative_to(ROOT))
        if page not in PAGES:
            assert not marked(path.read_text()), f"{page} has generated sections: add it to generate.docs.PAGES"


def test_docs_name_every_job_setting_and_timer():
    readme, configuration, deployment = map(text_of, ("README.md", "docs/configuration.md", "docs/deployment.md"))
    for job in REGISTRY.jobs:
        assert f"| `{job.name}` |" in readme
        assert f"skybot-cleanup-{job.name}.timer" in deployment
    for name in DefaultSettings.model_fields:
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


@pytest.mark.parametrize("path", [README, CHANGELOG, *DOCS], ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_and_anchor_exists(path):
    for target in LINK.findall(CODE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.name}: {target}: no such heading"


# -- exit codes by name (errors.ExitCode) -------------------------------------------------------

# How a literal exit code reads in a string: "exit 2", "exits 75", "ExitStatus=75",
# "exit_code != 2", "[ $rc -eq 75 ]", "values: [2]", "any exit code but 0", "(0 ok, 1 ...".
SPELLED_CODE = re.compile(
    r"\bexit(?:s|ed)?(?: codes?| status)?:?\s+\d|ExitStatus=\d|exit_code\s*[!=<>]=?\s*\d|-eq\s+\d|"
    r"values: \[\d|\bbut \d\b|\(\d+ (?:ok|success)\b|\b(?:75|128|130|143)\b",
    re.I,
)
# errors.py defines the codes; everywhere else names them.
DEFINITION = PACKAGE / "errors.py"


def string_literals(path: Path) -> list[tuple[int, str]]:
    """The text of each string in a module, docstrings and comments aside, with the
    replacement fields of f-strings and str.format templates taken out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, re.sub(r"\{[^{}]*\}", "", node.value)))
    return found


def spelled_codes(path: Path) -> list[str]:
    """Where a module spells an exit code instead of naming it: in a string, as the
    number 75 or 128, or as a literal passed to an exit (typer.Exit(1), sys.exit(2),
    _fail(..., 1), exit_code=2)."""
    found = [f"{path.name}:{line}: {text!r}" for line, text in string_literals(path) if SPELLED_CODE.search(text)]
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.NUMBER and token.string in ("75", "128"):
            found.append(f"{path.name}:{token.start[0]}: {token.line.strip()}")
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        values = [keyword.value for keyword in node.keywords if keyword.arg == "exit_code"]
        if name in ("Exit", "exit", "SystemExit"):
            values += node.args
        elif name == "_fail":
            values += node.args[1:]
        for value in values:
            for constant in ast.walk(value):
                if isinstance(constant, ast.Constant) and type(constant.value) is int:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize(
    "path", sorted(set(PACKAGE.rglob("*.py")) - {DEFINITION}), ids=lambda path: str(path.relative_to(PACKAGE))
)
def test_no_module_spells_an_exit_code(path):
    """The help, the README's table, the alert rules and their tests, the deploy files:
    each is generated from errors.ExitCode, so changing a code there changes them all."""
    assert spelled_codes(path) == []


def test_the_exit_code_scan_finds_what_it_looks_for(tmp_path):
    """The scan above, shown to catch each way a code used to be spelled."""
    module = tmp_path / "old.py"
    module.write_text(
        '''"""A docstring may say exit 2."""
import sys
import typer
HELP = "Exit codes: 0 ok, 1 failure"
RULE = "x_last_exit_code != 0 and x_last_exit_code == 2"
UNIT = "SuccessExitStatus=75"
CRON = "[ $rc -eq 0 ] || logger"
POLICY = "values: [2]"
RENDER = f"any exit code but 0, not {sys.argv}"
SKIPPED = 75
def status(healthy):
    raise typer.Exit(0 if healthy else 1)
def fail():
    sys.exit(2)
'''
    )
    lines = [int(finding.split(":")[1]) for finding in spelled_codes(module)]
    assert lines == [4, 5, 6, 7, 8, 9, 10, 12, 12, 14]  # not line 1: a docstring may explain


def test_the_readme_and_the_help_give_every_exit_code():
    readme = README.read_text()
    completed = run_cli("--help")
    for code in ExitCode:
        assert f"\n| {code} | {code.meaning} |" in readme
        assert f"{code} {code.summary}" in " ".join(completed.stdout.split())


def test_every_exit_code_the_docs_quote_is_a_real_one():
    """Prose may say "exits 2" or "exit 143": each such number is a code of ExitCode, or
    a signal's (128 + N)."""
    real = {int(code) for code in ExitCode} | {EXIT_SIGNAL_BASE + int(number) for number in signal.Signals}
    for path in [README, CHANGELOG, *DOCS]:
        # "exits 128 + the signal" is the base, not a code.
        quoted = re.findall(r"\bexit(?:s|ed|ing)?(?: code| status)?\s+`?(\d+)\b(?! ?\+)", path.read_text(), re.I)
        assert {int(code) for code in quoted} <= real, f"{path.name} quotes an exit code the tool does not have"


# -- the alerts -------------------------------------------------------------------------------------


def test_monitoring_lists_every_alert_of_the_rules():
    rules = yaml.safe_load((DEPLOY / "monitoring" / "rules.yml").read_text())["groups"][0]["rules"]
    listed = re.findall(r"^\| `(Skybot\w+)` \|", text_of("docs/monitoring.md"), re.M)
    assert listed == list(dict.fromkeys(rule["alert"] for rule in rules))


# -- releases you can tell apart ------------------------------------------------------------------


def versions() -> list[str]:
    return re.findall(r"^## \[(\d+\.\d+\.\d+)\]", CHANGELOG.read_text(), re.M)


def test_the_changelog_newest_version_is_the_packages():
    found = versions()
    assert found and found[0] == __version__, f"CHANGELOG.md's newest version is {found[:1]}, not {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)  # semantic versioning
    as_numbers = [tuple(map(int, version.split("."))) for version in found]
    assert as_numbers == sorted(set(as_numbers), reverse=True), "versions newest first, each once"
    assert "### Upgrading from" in CHANGELOG.read_text().split("\n## [")[1], "the newest release says how to upgrade"


def test_version_shows_in_version_and_config():
    env = {"DATABASE_URL": "sqlite://"}
    assert run_cli("--version").stdout == f"skybot-cleanup {__version__}\n"
    assert run_cli("config", env=env).stdout.splitlines()[0] == f"skybot-cleanup {__version__}"
    assert json.loads(run_cli("config", "--json", env=env).stdout)["version"] == __version__


def test_docs_name_the_current_image_tag():
    for path in [README, *DOCS]:
        for tag in re.findall(r"skybot-cleanup:(\d+\.\d+\.\d+)", path.read_text()):
            assert tag == __version__, f"{path.name} builds skybot-cleanup:{tag}"


def test_readme_development_commands_name_the_generators_and_every_format():
    text = README.read_text()
    assert ".venv/bin/python -m skybot_cleanup.generate.docs " in text
    (formats,) = re.findall(r"^for f in ([a-z ]+); do .venv/bin/skybot-cleanup schedule", text, re.M)
    assert formats.split() == list(FORMATS)
    assert "[CHANGELOG.md](CHANGELOG.md)" in text
