"""Local files other users may be able to touch: the state directory's spool, textfiles,
generated units. The tool often runs as root (cron) beside directories other users can
write, so it opens what it writes and reads without following a link another user
planted, creates files exclusively with their final mode whatever the umask, reads only
regular files and only a bounded amount of them, and leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# O_NONBLOCK: opening a FIFO planted at the path must not wait for a writer.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK


class UnsafePath(OSError):
    """A path the tool will not use (its message says why); an OSError, so every caller
    that copes with an unwritable path copes with this one too."""

    def __init__(self, path: Path | str, why: str):
        super().__init__(f"{path} {why}")
        self.strerror = f"{path} {why}"


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _check_links(path: Path) -> None:
    """Every link on the way to `path` belongs to root or to this user."""
    current = Path(path.anchor)
    for part in path.parts[1:]:
        current = current / part
        try:
            info = current.lstat()
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode) and not _trusted_owner(info.st_uid):
            raise UnsafePath(current, f"is a link owned by uid {info.st_uid}, not by this user or root")


def _check_ancestors(real: Path) -> None:
    """No other user can rename or replace anything on the way: each directory above is
    root's or this user's, and not writable by others (unless sticky, as /tmp is)."""
    for ancestor in reversed(real.parents):
        info = ancestor.stat()
        if not _trusted_owner(info.st_uid):
            raise UnsafePath(ancestor, f"belongs to uid {info.st_uid}, not to this user or root")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise UnsafePath(ancestor, "is writable by group or others")


def _others_can_change(info: os.stat_result) -> bool:
    """Another user could rename or replace what this directory holds: it is not root's
    or this user's, or it is writable by group or others and not sticky (as /tmp is)."""
    return not _trusted_owner(info.st_uid) or bool(info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX)


# The kernel's own limit on the links one path resolution may follow.
_MAX_LINKS = 40


def open_through_trusted_links(path: Path | str, *, directory: bool) -> tuple[int, bool]:
    """An open descriptor of `path` (a directory, or a file opened for reading without
    waiting on a FIFO), and whether a link was followed on the way. The path is resolved
    one component at a time, each opened relative to the last, so nothing can be swapped
    for a link between a check and its use; a link is followed only when it belongs to
    root or this user and sits in a directory that no one else can change (a Kubernetes
    secret's `..data` links do; a link an unprivileged user planted in /tmp does not).
    Raises OSError: UnsafePath for a link it will not follow."""
    text = os.fspath(path)
    if not text:
        raise FileNotFoundError(2, "No such file or directory")
    pending = text.split("/")
    current = os.open("/" if text.startswith("/") else ".", os.O_RDONLY | os.O_DIRECTORY)
    followed = 0
    try:
        while pending:
            name = pending.pop(0)
            if name in ("", "."):
                continue
            info = os.stat(name, dir_fd=current, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                if not _trusted_owner(info.st_uid):
                    raise UnsafePath(
                        text, f"is reached through a link ({name}) owned by uid {info.st_uid}, not by this user or root"
                    )
                if _others_can_change(os.fstat(current)):
                    raise UnsafePath(text, f"is reached through a link ({name}) in a directory other users can change")
                followed += 1
                if followed > _MAX_LINKS:
                    raise UnsafePath(text, "is reached through too many links")
                target = os.readlink(name, dir_fd=current)
                if target.startswith("/"):
                    os.close(current)
                    current = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
                pending = target.split("/") + pending
                continue
            last = all(part in ("", ".") for part in pending)
            opened = os.open(name, _READ if last and not directory else _DIRECTORY, dir_fd=current)
            os.close(current)
            current = opened
    except BaseException:
        os.close(current)
        raise
    return current, followed > 0


def open_directory_through_trusted_links(path: Path | str) -> int:
    """An open directory, reached through no link another user planted or could change
    (see open_through_trusted_links); whoever owns the directory itself. Raises OSError."""
    fd, _ = open_through_trusted_links(path, directory=True)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):  # pragma: no cover - O_DIRECTORY makes sure
        os.close(fd)
        raise UnsafePath(path, "is not a directory")
    return fd


def _check_own_directory(fd: int, path: Path | str) -> None:
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
        raise UnsafePath(path, f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})")
    if info.st_mode & 0o022:
        raise UnsafePath(path, "is writable by group or others (chmod go-w)")


def _make_path(path: Path, mode: int) -> Path:
    """The real path of `path`, its missing directories created with `mode`, once every
    link and every existing directory on the way is shown to be beyond other users' reach."""
    path = Path(os.path.abspath(path))
    _check_links(path)
    real = Path(os.path.realpath(path))
    existing = real
    while not existing.exists():
        existing = existing.parent
    _check_ancestors(existing / "x")
    for missing in reversed([real, *real.parents][: len(real.parts) - len(existing.parts)]):
        with contextlib.suppress(FileExistsError):
            os.mkdir(missing, mode)
    return real


def _open_directory(real: Path) -> int:
    try:
        return os.open(real, _DIRECTORY)
    except OSError as exc:
        raise UnsafePath(real, f"cannot be opened as a directory ({exc.strerror})") from None


def open_private_directory(path: Path) -> int:
    """An open descriptor of `path`, created 0700 where missing: this user's own
    directory, reached through no one else's link or writable directory. Raises UnsafePath."""
    real = _make_path(path, 0o700)
    fd = _open_directory(real)
    try:
        _check_own_directory(fd, real)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_subdirectory(parent: int, name: str, *, create: bool = True) -> int:
    """`name` inside an open private directory, created 0700 where missing (unless not
    `create`: FileNotFoundError), never a link."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
    try:
        fd = os.open(name, _DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        raise
    except OSError as exc:  # a link (ELOOP), or not a directory
        raise UnsafePath(name, f"is not a directory of this user's ({exc.strerror})") from None
    try:
        _check_own_directory(fd, name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_shared_directory(path: Path) -> int:
    """An open descriptor of `path` (created 0755, with its parents, where missing): this
    user's or root's, reached through no other user's link or writable directory. For
    files meant to be read by others (generated units), where open_private_directory
    would be too strict. Raises UnsafePath."""
    real = _make_path(path, 0o755)
    fd = _open_directory(real)
    info = os.fstat(fd)
    if not _trusted_owner(info.st_uid):
        os.close(fd)
        raise UnsafePath(real, f"belongs to uid {info.st_uid}, not to this user or root: choose a directory of yours")
    return fd


def open_child_directory(parent: int, name: str, mode: int = 0o755) -> int:
    """`name` inside an open directory, created where missing; never a link, and this
    user's or root's. Raises UnsafePath."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent)
    try:
        fd = os.open(name, _DIRECTORY, dir_fd=parent)
    except OSError as exc:  # a link (ELOOP), or not a directory
        raise UnsafePath(name, f"is not a directory (a link?): {exc.strerror}") from None
    info = os.fstat(fd)
    if not _trusted_owner(info.st_uid):
        os.close(fd)
        raise UnsafePath(name, f"belongs to uid {info.st_uid}, not to this user or root")
    return fd


@contextmanager
def closing_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def write_file(directory: int, name: str, data: bytes, mode: int) -> None:
    """`name` in the open `directory`, with exactly `mode`: written to a new file (created
    exclusively, never through a link) then renamed over the name, so a reader sees the
    old file or the whole new one, and a failed write (a full disk) leaves nothing."""
    temporary = f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=directory)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=directory)
        raise


def read_regular_file(name: Path | str, limit: int, *, directory: int | None = None, own: bool = False) -> bytes:
    """At most `limit` bytes of a regular file, opened without following a link or
    waiting on a FIFO; `own`: this user's, and writable by no one else (so no one else
    can have written it). Raises UnsafePath for anything else."""
    with closing_fd(os.open(name, _READ, dir_fd=directory)) as fd:
        info = _regular(fd, name, limit)
        if own and (info.st_uid != os.geteuid() or info.st_mode & 0o022):
            raise UnsafePath(
                name,
                f"is not this user's file, writable by no one else (uid {info.st_uid}, "
                f"mode {stat.S_IMODE(info.st_mode):04o})",
            )
        return os.read(fd, limit)


def read_named_file(path: Path | str, limit: int) -> tuple[bytes, os.stat_result]:
    """At most `limit` bytes of a regular file the operator named (a secret), and its
    status: reached through links only as open_through_trusted_links allows, and through
    a link only to a file of root's or this user's. Raises OSError (UnsafePath)."""
    fd, via_link = open_through_trusted_links(path, directory=False)
    with closing_fd(fd):
        info = _regular(fd, path, limit)
        if via_link and not _trusted_owner(info.st_uid):
            raise UnsafePath(path, f"is a link to a file of uid {info.st_uid}, not of this user or root")
        return os.read(fd, limit), info


def _regular(fd: int, name: Path | str, limit: int) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath(name, "is not a regular file")
    if info.st_size > limit:
        raise UnsafePath(name, f"is larger than {limit} bytes")
    return info
