"""README sections generated from the registry and the settings, so the docs cannot drift.

`python -m skybot_cleanup.generate.readme` rewrites the marked sections of README.md; a test
fails when they differ from what this module renders.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
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


def render(readme: str) -> str:
    for name, make in SECTIONS.items():
        # In prose an HTML comment marks a section; inside a shell example, a shell comment.
        pattern = re.compile(rf"((?:<!-- |# ){name}:start(?: -->)?)\n(?:.*?\n)?((?:<!-- |# ){name}:end(?: -->)?)", re.S)
        readme = pattern.sub(lambda m: f"{m.group(1)}\n{make()}\n{m.group(2)}", readme)  # noqa: B023 - used at once
    return readme


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text()))
