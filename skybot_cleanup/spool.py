"""The local spool: run records the database could not take, one JSON file each, kept
in the state directory until a run that reaches the same database records them.

Files are written 0600 in a 0700 directory of this user's own, atomically, and claimed
by rename, so two runs never record the same entry twice. Only entries no one else can
have written (this user's files, writable by no one else, in this user's directory
that no one else can change), parsed as entries the tool wrote, are ever replayed;
anything else is set aside as *.bad. Entries are matched to a database by user and
database name (not host or port, so a run that failed on a wrong port is recorded once
the URL is right). Every operation is best effort: a state directory that cannot be
read is no reason for a run to fail.

Releases, up and down: this release writes into a directory of its own
(`pending-runs-v2`), which no earlier release reads, because 0.1.0 sets aside any entry
with a field it does not know; it reads and drains that directory and the earlier ones
(`pending-runs`: 0.1.0 wrote its entries 0644 there, in a 0755 directory).
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

# The spool's directory, under the state directory: this release's entries. A new
# number when an entry gains a field that an earlier release's reader would refuse.
PENDING_RUNS = "pending-runs-v2"
# Earlier releases' directories: read and drained, never written.
EARLIER_PENDING_RUNS = ("pending-runs",)

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


# An entry is a few hundred bytes, its error text included; a text longer than
# MAX_TEXT_CHARS is cut when the entry is written, so nothing this release writes comes
# near MAX_ENTRY_BYTES. That limit is generous for the entries earlier releases wrote
# whole: past it, a file is not a run's record.
MAX_TEXT_CHARS = 16 * 1024
MAX_ENTRY_BYTES = 1024 * 1024
_warned: set[str] = set()


def reset() -> None:
    """Warn again (a new command in the same process)."""
    _warned.clear()


def _warn_once(event: str, **fields: Any) -> None:
    if event not in _warned:
        _warned.add(event)
        get_logger().warning(event, **fields)


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        return f"{value[:MAX_TEXT_CHARS]}... [{len(value) - MAX_TEXT_CHARS} characters cut]"
    return value


class Spool:
    """The spool's directories are opened once, as this user's own (localfiles): every
    file operation is relative to them, so no path on the way can be swapped for a link.
    A state directory the tool cannot trust is not used at all (one warning): the runs
    it would have kept are then recorded by their logs and heartbeat alone. Names handed
    out by `claim` are `<directory>/<file>`."""

    def __init__(self, state_directory: Path, decode: Decoder):
        self.state_directory = state_directory
        self.directory = state_directory / PENDING_RUNS
        self.decode = decode
        self._fds: dict[str, int] | None = None

    @classmethod
    def in_state_directory(cls, configured: str | None, decode: Decoder) -> Spool:
        return cls(state_directory(configured), decode)

    def _open(self) -> dict[str, int]:
        """The open spool directories, earlier releases' first (older entries first):
        this release's, created where missing, and each earlier one that exists. Raises
        UnsafePath (an OSError) when the state directory cannot be trusted."""
        if self._fds is None:
            fds: dict[str, int] = {}
            try:
                with closing_fd(open_private_directory(self.state_directory)) as state:
                    for name in EARLIER_PENDING_RUNS:
                        earlier = self._open_earlier(state, name)
                        if earlier is not None:
                            fds[name] = earlier
                    fds[PENDING_RUNS] = open_private_subdirectory(state, PENDING_RUNS)
            except OSError as exc:
                for fd in fds.values():
                    os.close(fd)
                _warn_once(
                    "state_directory_unusable",
                    error=f"{exc.strerror or exc}",
                    hint="the state directory keeps runs the database could not take; it must be this user's own, "
                    "reached through no other user's link, and writable by no one else (SKYBOT_CLEANUP_STATE_DIR)",
                )
                raise
            self._fds = fds
        return self._fds

    def _open_earlier(self, state: int, name: str) -> int | None:
        """An earlier release's directory; None when there is none, or (one warning) when
        another user could have written into it: its entries then wait, neither replayed
        nor set aside."""
        try:
            return open_private_subdirectory(state, name, create=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            _warn_once(
                "spool_directory_unusable",
                directory=str(self.state_directory / name),
                error=f"{exc.strerror or exc}",
                hint="runs an earlier release kept there are replayed once it is this user's own and writable by "
                "no one else (chmod go-w)",
            )
            return None

    def _dir(self, name: str = PENDING_RUNS) -> int:
        return self._open()[name]

    def close(self) -> None:
        for fd in (self._fds or {}).values():
            os.close(fd)
        self._fds = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def add(self, database: str, name: str, entry: Entry) -> str:
        """Write one entry as <name>.json: 0600, created exclusively, atomically, its
        long texts cut. Raises OSError."""
        filename = f"{name}.json"
        data = {"database": database, **{key: _cut(value) for key, value in entry.items()}}
        write_file(self._dir(), filename, json.dumps(data).encode(), 0o600)
        return f"{PENDING_RUNS}/{filename}"

    def _directories(self) -> list[str]:
        try:
            return list(self._open())
        except OSError:
            return []

    def _names(self, directory: str, suffix: str) -> list[str]:
        try:
            names = os.listdir(self._dir(directory))
        except OSError:
            return []
        return sorted(name for name in names if name.endswith(suffix) or suffix in name)

    def _reclaim_stale(self, directory: str) -> None:
        """Claims left by a process that died between claiming and recording."""
        for name in self._names(directory, ".json.claimed-"):
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    self._rename(directory, name, name.rsplit(".claimed-", 1)[0])

    def _rename(self, directory: str, old: str, new: str) -> None:
        fd = self._dir(directory)
        os.rename(old, new, src_dir_fd=fd, dst_dir_fd=fd)

    def _read(self, directory: str, name: str) -> tuple[str, Entry] | str:
        """(database, entry), or why the file is not an entry the tool wrote."""
        try:
            data = read_regular_file(name, MAX_ENTRY_BYTES, directory=self._dir(directory), own=True)
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

    def _quarantine(self, directory: str, name: str, original: str, why: str) -> None:
        """Set aside, never inserted, never retried."""
        with contextlib.suppress(OSError):
            self._rename(directory, name, f"{original}.bad")
        _warn_once("spool_entry_quarantined", file=f"{self.state_directory / directory / original}.bad", error=why)

    def entries(self, database: str) -> list[Entry]:
        """The waiting entries of one database, unclaimed (for status and history)."""
        found = []
        for directory in self._directories():
            for name in self._names(directory, ".json"):
                if name.endswith(".json"):
                    read = self._read(directory, name)
                    if not isinstance(read, str) and read[0] == database:
                        found.append(read[1])
        return found

    def claim(self, database: str) -> list[tuple[str, Entry]]:
        claimed = []
        for directory in self._directories():
            self._reclaim_stale(directory)
            for name in self._names(directory, ".json"):
                if not name.endswith(".json") or name.startswith("."):
                    continue
                mine = f"{name}.claimed-{os.getpid()}"
                try:
                    self._rename(directory, name, mine)
                except OSError:
                    continue  # another run claimed it first
                read = self._read(directory, mine)
                if isinstance(read, str):
                    self._quarantine(directory, mine, name, read)
                    continue
                if read[0] != database:
                    with contextlib.suppress(OSError):
                        self._rename(directory, mine, name)
                    continue
                claimed.append((f"{directory}/{mine}", read[1]))
        return claimed

    def done(self, names: Iterable[str]) -> None:
        for claimed in names:
            directory, _, name = claimed.partition("/")
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dir(directory))

    def release(self, names: Iterable[str]) -> None:
        for claimed in names:
            directory, _, name = claimed.partition("/")
            with contextlib.suppress(OSError):
                self._rename(directory, name, name.rsplit(".claimed-", 1)[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
