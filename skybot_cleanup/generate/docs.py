"""The generated sections of the README and the docs/ pages, so the docs cannot drift
from the code they describe: the commands (the registry), the exit codes
(errors.ExitCode), the settings (settings.DefaultSettings), the install steps and timers
(generate.deploy, the registry), the alerts (generate.alerts, the same rules as
deploy/monitoring/) and the layers (generate.layers).

`python -m skybot_cleanup.generate.docs` rewrites the marked sections of every page in
PAGES; a test fails when one differs from what this module renders.
"""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from skybot_cleanup.errors import EXIT_SIGNAL_BASE, ExitCode, exit_code_for_signal
from skybot_cleanup.generate.alerts import rules
from skybot_cleanup.generate.deploy import INSTALL, LINK
from skybot_cleanup.generate.layers import LAYERS
from skybot_cleanup.registry import REGISTRY
from skybot_cleanup.schedule import describe
from skybot_cleanup.settings import ENV_FILE_VARIABLE, DefaultSettings, env_name

PACKAGE = Path(__file__).resolve().parents[1]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def tasks_table() -> str:
    rows = ["| command | schedule (UTC) | what it deletes (or does) |", "|---|---|---|"]
    for task in REGISTRY.tasks:
        rows.append(f"| `{task.name}` | {describe(task.schedule)} (`{task.schedule}`) | {_cell(task.rule)} |")
    metrics = REGISTRY.metrics
    rows.append(f"| `{metrics.name}` | {describe(metrics.schedule)} (`{metrics.schedule}`) | {metrics.summary} |")
    return "\n".join(rows)


def exit_codes_table() -> str:
    rows = ["| code | meaning | retried first? |", "|---|---|---|"]
    rows += [f"| {code} | {_cell(code.meaning)} | {code.retried} |".replace("|  |", "| |") for code in ExitCode]
    rows.append(
        f"| {EXIT_SIGNAL_BASE}+N | stopped by signal N: {exit_code_for_signal(signal.SIGTERM)} for SIGTERM, "
        f"{exit_code_for_signal(signal.SIGINT)} for SIGINT | |"
    )
    rows += [
        "",
        f"`all` returns the most serious code of its tasks ({ExitCode.CONFIG}, then {ExitCode.FAILURE}, then a "
        f"signal, then {ExitCode.SKIPPED}, then {ExitCode.OK}).",
    ]
    return "\n".join(rows)


def settings_table() -> str:
    rows = [
        "| variable | default | meaning |",
        "|---|---|---|",
        f"| `{ENV_FILE_VARIABLE}` | `.env` | Settings file to read: KEY=value lines taken literally (no "
        "quoting or interpolation needed); the same file serves systemd's EnvironmentFile. |",
    ]
    for name, field in DefaultSettings.model_fields.items():
        default = "(none)" if field.default is None else f"`{field.default}`"
        rows.append(f"| `{env_name(name)}` | {default} | {field.description} |")
    return "\n".join(rows)


def install_steps() -> str:
    return "\n".join([*INSTALL, LINK])


def timers() -> str:
    return "sudo systemctl enable --now " + " ".join(f"skybot-cleanup-{job.name}.timer" for job in REGISTRY.jobs)


def _module_path(module: str) -> str:
    path = module.replace(".", "/")
    return f"{path}/__init__.py" if (PACKAGE / path).is_dir() else f"{path}.py"


def layers_table() -> str:
    rows = ["| layer | module | what it holds |", "|---|---|---|"]
    for level, modules in enumerate(LAYERS):
        rows += [f"| {level} | `{_module_path(module)}` | {_cell(holds)} |" for module, holds in modules.items()]
    return "\n".join(rows)


# Prometheus template fields as placeholders, like the CLI's metavars (Markdown would take
# <task> for an HTML tag).
_TEMPLATE_FIELDS = {
    "{{ $value | humanizeDuration }}": "DURATION",
    "{{ $value }}": "VALUE",
    "{{ $labels.task }}": "TASK",
    "{{ $labels.instance }}": "INSTANCE",
}


def _untemplated(text: str) -> str:
    for field, shown in _TEMPLATE_FIELDS.items():
        text = text.replace(field, shown)
    return _cell(text)


def alerts_table() -> str:
    """Every alert of deploy/monitoring/rules.yml, once each (a rule per job shares one row)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rule in rules(REGISTRY)["groups"][0]["rules"]:
        by_name.setdefault(rule["alert"], []).append(rule)
    rows = ["| alert | severity | fires when | after | what to do |", "|---|---|---|---|---|"]
    for name, found in by_name.items():
        first = found[0]
        if len(found) > 1:  # one rule per job, each waiting its own time
            after = ", ".join(f"{rule['for']} ({rule['labels']['task']})" for rule in found)
        else:
            after = first.get("for", "at once")
        annotations = first["annotations"]
        rows.append(
            f"| `{name}` | {first['labels']['severity']} | {_untemplated(annotations['summary'])} | {after} | "
            f"{_untemplated(annotations.get('description', ''))} |"
        )
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "tasks": tasks_table,
    "exit-codes": exit_codes_table,
    "settings": settings_table,
    "install": install_steps,
    "timers": timers,
    "layers": layers_table,
    "alerts": alerts_table,
}
# Each page, relative to the repository's root, and the sections it carries.
PAGES: dict[str, tuple[str, ...]] = {
    "README.md": ("tasks", "exit-codes"),
    "docs/configuration.md": ("settings",),
    "docs/deployment.md": ("install", "timers"),
    "docs/architecture.md": ("layers",),
    "docs/monitoring.md": ("alerts",),
}


def _pattern(name: str) -> re.Pattern[str]:
    # In prose an HTML comment marks a section; inside a shell example, a shell comment.
    return re.compile(rf"((?:<!-- |# ){name}:start(?: -->)?)\n(?:.*?\n)?((?:<!-- |# ){name}:end(?: -->)?)", re.S)


def marked(text: str) -> set[str]:
    """The sections a page has markers for."""
    return {name for name in SECTIONS if _pattern(name).search(text)}


def render_sections(text: str, sections: Iterable[str] = SECTIONS) -> str:
    """The page with each of these sections (where it is marked) rendered anew."""
    for name in sections:
        make = SECTIONS[name]
        text = _pattern(name).sub(lambda m: f"{m.group(1)}\n{make()}\n{m.group(2)}", text)  # noqa: B023 - used at once
    return text


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")  # the repository's root
    rendered = {root / page: render_sections((root / page).read_text(), names) for page, names in PAGES.items()}
    for path, text in rendered.items():  # every page read first: a missing one changes nothing
        path.write_text(text)
