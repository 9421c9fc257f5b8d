"""Doc sections generated from the registry and the settings, so the docs cannot drift.

`python -m skybot_cleanup.generate.readme` rewrites the marked sections of every page in
PAGES (README.md and the docs/ pages that have any); a test fails when one differs from
what this module renders.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.schedule import describe
from skybot_cleanup.settings import ENV_FILE_VARIABLE, Settings, env_name


def tasks_table() -> str:
    rows = ["| command | schedule (UTC) | what it deletes (or does) |", "|---|---|---|"]
    for task in REGISTRY.tasks:
        rule = task.rule.replace("|", "\\|")
        rows.append(f"| `{task.name}` | {describe(task.schedule)} (`{task.schedule}`) | {rule} |")
    metrics = REGISTRY.metrics
    rows.append(f"| `{metrics.name}` | {describe(metrics.schedule)} (`{metrics.schedule}`) | {metrics.summary} |")
    return "\n".join(rows)


def settings_table() -> str:
    rows = [
        "| variable | default | meaning |",
        "|---|---|---|",
        f"| `{ENV_FILE_VARIABLE}` | `.env` | Settings file to read: KEY=value lines taken literally (no "
        "quoting or interpolation needed); the same file serves systemd's EnvironmentFile. |",
    ]
    for name, field in Settings.model_fields.items():
        default = "(none)" if field.default is None else f"`{field.default}`"
        rows.append(f"| `{env_name(name)}` | {default} | {field.description} |")
    return "\n".join(rows)


def timers() -> str:
    return "sudo systemctl enable --now " + " ".join(f"skybot-cleanup-{job.name}.timer" for job in REGISTRY.jobs)


SECTIONS: dict[str, Callable[[], str]] = {"tasks": tasks_table, "settings": settings_table, "timers": timers}
# Each page, relative to the repository's root, and the sections it carries.
PAGES: dict[str, tuple[str, ...]] = {
    "README.md": ("tasks",),
    "docs/configuration.md": ("settings",),
    "docs/deployment.md": ("timers",),
}


def _pattern(name: str) -> re.Pattern[str]:
    # In prose an HTML comment marks a section; inside a shell example, a shell comment.
    return re.compile(rf"((?:<!-- |# ){name}:start(?: -->)?)\n(?:.*?\n)?((?:<!-- |# ){name}:end(?: -->)?)", re.S)


def marked(text: str) -> set[str]:
    """The sections a page has markers for."""
    return {name for name in SECTIONS if _pattern(name).search(text)}


def render(text: str, sections: Iterable[str] = SECTIONS) -> str:
    """The page with each of these sections (where it is marked) rendered anew."""
    for name in sections:
        make = SECTIONS[name]
        text = _pattern(name).sub(lambda m: f"{m.group(1)}\n{make()}\n{m.group(2)}", text)  # noqa: B023 - used at once
    return text


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")  # the repository's root
    rendered = {root / page: render((root / page).read_text(), names) for page, names in PAGES.items()}
    for path, text in rendered.items():  # every page read first: a missing one changes nothing
        path.write_text(text)
