"""README tables generated from the registry and the settings, so the docs cannot drift.

`python -m skybot_cleanup.docs` rewrites the marked sections of README.md; a test
fails when they differ from what this module renders.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from skybot_cleanup.settings import ENV_FILE_VARIABLE, Settings, env_name
from skybot_cleanup.tasks import JOBS


def tasks_table() -> str:
    rows = ["| command | schedule (UTC, cron) | what it removes (or does) |", "|---|---|---|"]
    for job in JOBS:
        rule = (getattr(job, "rule", None) or job.summary).replace("|", "\\|")
        rows.append(f"| `{job.name}` | `{job.schedule}` | {rule} |")
    return "\n".join(rows)


def settings_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|",
            f"| `{ENV_FILE_VARIABLE}` | `.env` | Settings file to read (KEY=value lines, no shell quoting "
            "needed); the same file serves systemd's EnvironmentFile. |"]
    for name, field in Settings.model_fields.items():
        default = "(none)" if field.default is None else f"`{field.default}`"
        rows.append(f"| `{env_name(name)}` | {default} | {field.description} |")
    return "\n".join(rows)


SECTIONS = {"tasks": tasks_table, "settings": settings_table}


def render(readme: str) -> str:
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(\n<!-- {name}:end -->)", re.S)
        readme = pattern.sub(lambda m: m.group(1) + make() + m.group(2), readme)
    return readme


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text()))
