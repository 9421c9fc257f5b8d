"""The local spool: run records the database could not take, one JSON file each, kept
in the state directory until a run that reaches the same database records them.

Files are 0600 in a 0700 directory of this user's own, written atomically, and claimed
by rename, so two runs never record the same entry twice; only such files, parsed as
entries the tool wrote, are ever replayed (anything else is set aside as *.bad).
Entries are matched to a database by user and database name (not host or port, so a
run that failed on a wrong port is recorded once the URL is right). Every operation is
best effort: a state directory that cannot be read is no reason for a run to fail.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from skybot_cleanup.localfiles import (
    UnsafePath,
    closing_fd,
    open_private_directory,
    open_private_subdirectory,
    read_regular_file,
    write_file,
)
from skybot_cleanup.logs import get_logger

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


# An entry is a few hundred bytes: anything much larger is not one of ours.
MAX_ENTRY_BYTES = 64 * 1024
_warned: set[str] = set()


def _warn_once(event: str, **fields: Any) -> None:
    if event not in _warned:
        _warned.add(event)
        get_logger().warning(event, **fields)


class Spool:
    """The spool's directory is opened once, as this user's own (localfiles): every file
    operation is relative to it, so no path on the way can be swapped for a link. A
    directory the tool cannot trust is not used at all (one warning): the runs it would
    have kept are then recorded by their logs and heartbeat alone."""

    def __init__(self, state_directory: Path, decode: Decoder):
        self.state_directory = state_directory
        self.directory = state_directory / PENDING_RUNS
        self.decode = decode
        self._fd: int | None = None

    @classmethod
    def in_state_directory(cls, configured: str | None, decode: Decoder) -> Spool:
        return cls(state_directory(configured), decode)

    def _dir(self) -> int:
        """The open spool directory; raises UnsafePath (an OSError) when it cannot be trusted."""
        if self._fd is None:
            try:
                with closing_fd(open_private_directory(self.state_directory)) as state:
                    self._fd = open_private_subdirectory(state, PENDING_RUNS)
            except OSError as exc:
                _warn_once(
                    "state_directory_unusable",
                    error=f"{exc.strerror or exc}",
                    hint="the state directory keeps runs the database could not take; it must be this user's own, "
                    "reached through no other user's link (SKYBOT_CLEANUP_STATE_DIR)",
                )
                raise
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def add(self, database: str, name: str, entry: Entry) -> str:
        """Write one entry as <name>.json: 0600, created exclusively, atomically. Raises OSError."""
        filename = f"{name}.json"
        write_file(self._dir(), filename, json.dumps({"database": database, **entry}).encode(), 0o600)
        return filename

    def _names(self, suffix: str) -> list[str]:
        try:
            return sorted(name for name in os.listdir(self._dir()) if name.endswith(suffix) or suffix in name)
        except OSError:
            return []

    def _reclaim_stale(self) -> None:
        """Claims left by a process that died between claiming and recording."""
        for name in self._names(".json.claimed-"):
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    self._rename(name, name.rsplit(".claimed-", 1)[0])

    def _rename(self, old: str, new: str) -> None:
        os.rename(old, new, src_dir_fd=self._dir(), dst_dir_fd=self._dir())

    def _read(self, name: str) -> tuple[str, Entry] | str:
        """(database, entry), or why the file is not an entry the tool wrote."""
        try:
            data = read_regular_file(name, MAX_ENTRY_BYTES, directory=self._dir(), private=True)
            entry = json.loads(data)
        except UnsafePath as exc:
            return str(exc.strerror)
        except (OSError, ValueError) as exc:
            return f"{name} cannot be read as an entry ({type(exc).__name__})"
        if not isinstance(entry, dict) or not isinstance(entry.get("database"), str):
            return f"{name} is not an entry"
        database = entry.pop("database")
        decoded = self.decode(entry)
        return f"{name} is not an entry the tool wrote" if decoded is None else (database, decoded)

    def _quarantine(self, name: str, original: str, why: str) -> None:
        """Set aside, never inserted, never retried."""
        with contextlib.suppress(OSError):
            self._rename(name, f"{original}.bad")
        _warn_once("spool_entry_quarantined", file=f"{self.directory}/{original}.bad", error=why)

    def entries(self, database: str) -> list[Entry]:
        """The waiting entries of one database, unclaimed (for status and history)."""
        found = []
        for name in self._names(".json"):
            if name.endswith(".json"):
                read = self._read(name)
                if not isinstance(read, str) and read[0] == database:
                    found.append(read[1])
        return found

    def claim(self, database: str) -> list[tuple[str, Entry]]:
        self._reclaim_stale()
        claimed = []
        for name in self._names(".json"):
            if not name.endswith(".json") or name.startswith("."):
                continue
            mine = f"{name}.claimed-{os.getpid()}"
            try:
                self._rename(name, mine)
            except OSError:
                continue  # another run claimed it first
            read = self._read(mine)
            if isinstance(read, str):
                self._quarantine(mine, name, read)
                continue
            if read[0] != database:
                with contextlib.suppress(OSError):
                    self._rename(mine, name)
                continue
            claimed.append((mine, read[1]))
        return claimed

    def done(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dir())

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(OSError):
                self._rename(name, name.rsplit(".claimed-", 1)[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
