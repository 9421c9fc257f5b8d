"""The local spool: run records the database could not take, one JSON file each, kept
in the state directory until a run that reaches the same database records them.

Files are written atomically and claimed by rename, so two runs never record the same
entry twice. Entries are matched to a database by user and database name (not host or
port, so a run that failed on a wrong port is recorded once the URL is right). Every
operation is best effort: a state directory that cannot be read is no reason for a run
to fail.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

# The spool's directory, under the state directory.
PENDING_RUNS = "pending-runs"

Entry = dict[str, Any]
# Makes a JSON entry (without its "database") into what the caller records, or None
# when it is not an entry the tool wrote.
Decoder = Callable[[Entry], Entry | None]


def state_directory(configured: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """SKYBOT_CLEANUP_STATE_DIR, else systemd's StateDirectory=, else the user's XDG state home."""
    environ = os.environ if environ is None else environ
    if configured:
        return Path(configured)
    if environ.get("STATE_DIRECTORY"):  # several are ':'-separated
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "skybot-cleanup"


class Spool:
    def __init__(self, directory: Path, decode: Decoder):
        self.directory = directory
        self.decode = decode

    @classmethod
    def in_state_directory(cls, configured: str | None, decode: Decoder) -> Spool:
        return cls(state_directory(configured) / PENDING_RUNS, decode)

    def add(self, database: str, name: str, entry: Entry) -> Path:
        """Write one entry as <name>.json, atomically. Raises OSError."""
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / f".{name}.json.tmp"
        temporary.write_text(json.dumps({"database": database, **entry}))
        path = self.directory / f"{name}.json"
        temporary.replace(path)
        return path

    def _files(self, pattern: str) -> list[Path]:
        try:
            return sorted(self.directory.glob(pattern)) if self.directory.is_dir() else []
        except OSError:
            return []

    def _reclaim_stale(self) -> None:
        """Claims left by a process that died between claiming and recording."""
        for path in self._files("*.json.claimed-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name.rsplit(".claimed-", 1)[0]))

    def _read(self, path: Path) -> tuple[str, Entry] | None:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("database"), str):
            return None
        database = entry.pop("database")
        decoded = self.decode(entry)
        return None if decoded is None else (database, decoded)

    def entries(self, database: str) -> list[Entry]:
        """The waiting entries of one database, unclaimed (for status and history)."""
        found = []
        for path in self._files("*.json"):
            read = self._read(path)
            if read is not None and read[0] == database:
                found.append(read[1])
        return found

    def claim(self, database: str) -> list[tuple[Path, Entry]]:
        self._reclaim_stale()
        claimed = []
        for path in self._files("*.json"):
            mine = path.with_name(f"{path.name}.claimed-{os.getpid()}")
            try:
                path.rename(mine)
            except OSError:
                continue  # another run claimed it first
            read = self._read(mine)
            if read is None:  # unreadable or malformed: set aside, never retried
                with contextlib.suppress(OSError):
                    mine.rename(path.with_name(f"{path.name}.bad"))
                continue
            if read[0] != database:
                with contextlib.suppress(OSError):
                    mine.rename(path)
                continue
            claimed.append((mine, read[1]))
        return claimed

    def done(self, paths: Iterable[Path]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def release(self, paths: Iterable[Path]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                path.rename(path.with_name(path.name.rsplit(".claimed-", 1)[0]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
