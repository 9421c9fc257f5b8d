"""A private primary and a streaming standby behind a throttled link, for the `replica`
benchmark and for anyone who needs one (`with streaming_standby(...) as pair:`).

The primary runs in this network namespace, listening on one end of a veth pair; the
standby runs in a namespace of its own at the other end and streams from the primary over
it. A token bucket (tc's `tbf`) on the primary's end throttles what the primary sends:
WAL to the standby. (This kernel has `tbf` but not `netem`; a delay would need a proxy,
benchmarks.netpath.) Both clusters are made with initdb from the machine's PostgreSQL, as
a non-root OS user (setpriv), in a temporary directory; the standby from pg_basebackup,
with a replication slot, so that WAL it has not received is never recycled. Needs root
(namespaces, tc, setpriv).

Everything is removed on the way out, failure or not: the clusters stopped, the namespace
and the veth pair deleted (the qdisc goes with the device), the directory removed. What
an earlier run killed outright left behind is removed when the next one starts.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

BINDIR = Path("/usr/lib/postgresql/15/bin")
OS_USER = "postgres"
PREFIX = "skybench-standby"  # the temporary directories and namespaces: PREFIX-<pid>-<token>
SLOT = "skybench_standby"
STANDBY_NAME = "skybench_standby"  # its application_name in pg_stat_replication


class StandbyUnavailable(RuntimeError):
    """What this machine lacks for a throttled standby (root, ip, tc, PostgreSQL's binaries)."""


@dataclass(frozen=True)
class Node:
    """One cluster: its data directory, and where its unix socket is."""

    directory: Path
    socket_dir: Path  # not the data directory: a base backup would copy the socket's lock file
    port: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{OS_USER}@/{database}?host={self.socket_dir}&port={self.port}"


@dataclass(frozen=True)
class Lag:
    """The standby's lag, as the primary and the standby see it, at one moment."""

    at: float  # time.monotonic()
    replay_lag_s: float | None  # pg_stat_replication.replay_lag, as shown (see replay_lag_since)
    write_lag_s: float | None
    byte_lag: int  # pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)
    replayed: int  # replay_lsn, in bytes from 0/0
    # On the standby: now() - pg_last_xact_replay_timestamp(), the age of the newest commit
    # it has replayed; 0 when it has replayed all the primary had written (idle is not lag).
    staleness_s: float

    def replay_lag_since(self, start: int) -> float:
        """replay_lag, for a window that began at WAL position `start`.

        pg_stat_replication shows the last replay_lag it measured until the standby has
        been idle a while: a standby that has just caught up with something slow (a
        CREATE DATABASE it copied, say) shows that lag into the next window. So: 0 while
        the standby has replayed all the primary wrote; and until it has replayed some of
        the window's own WAL, what is shown is not this window's lag, which is still
        growing from 0, so 0 too.
        """
        if self.byte_lag <= 0 or self.replayed <= start or self.replay_lag_s is None:
            return 0.0
        return self.replay_lag_s


@dataclass(frozen=True)
class Pair:
    primary: Node
    standby: Node
    address: str  # the primary's address on the link
    rate_bits: int  # the link's rate, bits per second

    def primary_url(self, database: str = "postgres") -> str:
        """Over TCP, on the link's address (as a client elsewhere would reach it)."""
        return f"postgresql://{OS_USER}@{self.address}:{self.primary.port}/{database}"

    def link_seconds(self, wal_bytes: int) -> float:
        """The link's own time for this much WAL: bytes over its rate."""
        return wal_bytes * 8 / self.rate_bits

    def lag(self, primary: psycopg.Connection[Any], standby: psycopg.Connection[Any]) -> Lag:
        row = primary.execute(
            """SELECT extract(epoch FROM replay_lag)::float8, extract(epoch FROM write_lag)::float8,
                      pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint,
                      pg_wal_lsn_diff(replay_lsn, '0/0')::bigint, pg_current_wal_lsn()::text
               FROM pg_stat_replication WHERE application_name = %s""",
            (STANDBY_NAME,),
        ).fetchone()
        if row is None:
            raise RuntimeError("the standby is not streaming (no row in pg_stat_replication)")
        replay_lag, write_lag, byte_lag, replayed, written = row
        seen = standby.execute(
            """SELECT pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn()) <= 0,
                      coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)::float8""",
            (written,),
        ).fetchone()
        assert seen is not None
        caught_up, age = seen
        staleness = 0.0 if caught_up else float(age)
        return Lag(time.monotonic(), replay_lag, write_lag, int(byte_lag), int(replayed), staleness)

    @staticmethod
    def position(conn: psycopg.Connection[Any]) -> int:
        """The primary's WAL insert position, in bytes from 0/0 (as Lag.replayed)."""
        row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint").fetchone()
        assert row is not None
        return int(row[0])

    def wait_caught_up(self, timeout_s: float = 900) -> float:
        """Until the standby has replayed all the primary has written; the seconds waited."""
        started = time.monotonic()
        with connect(self.primary.url()) as primary:
            while True:
                row = primary.execute(
                    """SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) FROM pg_stat_replication
                       WHERE application_name = %s""",
                    (STANDBY_NAME,),
                ).fetchone()
                if row is not None and row[0] is not None and row[0] <= 0:
                    return time.monotonic() - started
                if time.monotonic() - started > timeout_s:
                    raise RuntimeError(f"the standby did not catch up within {timeout_s:.0f} s")
                time.sleep(0.05)


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


# -- the machine ------------------------------------------------------------------------------


def run(*command: str, user: bool = False, namespace: str | None = None) -> str:
    """A command (as the clusters' OS user, in a namespace); its output. Fails loudly."""
    argv = list(command)
    if user:
        entry = pwd.getpwnam(OS_USER)
        argv = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--", *argv]
    if namespace:
        argv = ["ip", "netns", "exec", namespace, *argv]
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    if completed.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {completed.returncode}: {completed.stderr.strip()[-2000:]}")
    return completed.stdout


def missing(bindir: Path = BINDIR) -> str | None:
    """Why a throttled standby cannot be made here, or None."""
    if os.geteuid() != 0:
        return "a standby behind a throttled link needs root (network namespaces, tc, setpriv)"
    for program in ("ip", "tc", "setpriv"):
        if shutil.which(program) is None:
            return f"{program} is not installed (Debian: iproute2, util-linux)"
    if not (bindir / "initdb").exists():
        return f"no PostgreSQL server binaries in {bindir} (Debian: apt-get install postgresql-15)"
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        return f"no OS user {OS_USER!r} to run the clusters as"
    return None


def free_subnet() -> int:
    """x in 10.231.x.0/30: one no interface here uses."""
    used = run("ip", "-o", "-4", "addr", "show")
    taken = {int(x) for x in re.findall(r"inet 10\.231\.(\d+)\.", used)}
    choices = [x for x in range(256) if x not in taken]
    if not choices:
        raise RuntimeError("no free 10.231.x.0/30 subnet")
    return secrets.choice(choices)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_ctl(bindir: Path, directory: Path, *args: str, namespace: str | None = None) -> None:
    run(str(bindir / "pg_ctl"), "-D", str(directory), *args, user=True, namespace=namespace)


def start(bindir: Path, directory: Path, log: Path, *, namespace: str | None = None) -> None:
    try:
        pg_ctl(bindir, directory, "-l", str(log), "-w", "start", namespace=namespace)
    except RuntimeError as exc:
        tail = log.read_text()[-2000:] if log.exists() else "(no log)"
        raise RuntimeError(f"{exc}\n{log.name}:\n{tail}") from None


def stop(bindir: Path, directory: Path) -> None:
    if (directory / "postmaster.pid").exists():
        with contextlib.suppress(RuntimeError):
            pg_ctl(bindir, directory, "-m", "immediate", "-w", "stop")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(bindir: Path = BINDIR) -> None:
    """What runs that were killed outright (no finally) left: their clusters, namespaces
    and directories, recognised by a dead pid in their names."""
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"):
        match = re.match(rf"{PREFIX}-(\d+)-", path.name)
        if match and not alive(int(match.group(1))):
            for node in ("standby", "primary"):
                stop(bindir, path / node)
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(RuntimeError):
        for line in run("ip", "netns", "list").splitlines():
            name = line.split()[0] if line.split() else ""
            match = re.match(rf"{PREFIX}-(\d+)-", name)
            if match and not alive(int(match.group(1))):
                run("ip", "netns", "delete", name)


# -- the pair ---------------------------------------------------------------------------------


@contextmanager
def streaming_standby(
    rate_mbit: float = 100,
    *,
    prepare: Callable[[str], None] | None = None,
    bindir: Path = BINDIR,
    settings: str = "",
) -> Iterator[Pair]:
    """A primary and its streaming standby, WAL throttled to `rate_mbit` between them.

    prepare(primary_url) runs before the base backup, so whatever it seeds reaches the
    standby at disk speed rather than through the link. `settings`: more postgresql.conf
    lines for both clusters.
    """
    reason = missing(bindir)
    if reason:
        raise StandbyUnavailable(reason)
    remove_leftovers(bindir)
    token = secrets.token_hex(3)
    base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{os.getpid()}-{token}-"))
    namespace = f"{PREFIX}-{os.getpid()}-{token}"
    host_end, standby_end = f"sbh{token}", f"sbs{token}"  # interface names: 15 characters at most
    primary_dir, standby_dir = base / "primary", base / "standby"
    primary_socket, standby_socket = base / "primary.socket", base / "standby.socket"
    namespace_made = False
    try:
        for directory in (base, primary_socket, standby_socket):
            directory.mkdir(exist_ok=True)
            shutil.chown(directory, OS_USER, OS_USER)
        print(f"  standby: namespace {namespace}, clusters in {base}", file=sys.stderr, flush=True)
        x = free_subnet()
        address, standby_address = f"10.231.{x}.1", f"10.231.{x}.2"
        run("ip", "netns", "add", namespace)
        namespace_made = True
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", standby_end, "netns", namespace)
        run("ip", "addr", "add", f"{address}/30", "dev", host_end)
        run("ip", "link", "set", host_end, "up")
        run("ip", "-n", namespace, "addr", "add", f"{standby_address}/30", "dev", standby_end)
        run("ip", "-n", namespace, "link", "set", standby_end, "up")
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        # On the primary's end: what it sends (WAL) waits for tokens. 32 kbit of burst, and
        # up to 400 ms in the queue before a packet is dropped (TCP then backs off).
        run("tc", "qdisc", "add", "dev", host_end, "root", "tbf", "rate", f"{rate_mbit:g}mbit", "burst", "32kbit",
            "latency", "400ms")  # fmt: skip

        port = free_port()
        run(str(bindir / "initdb"), "-D", str(primary_dir), "-U", OS_USER, "--auth=trust", "-E", "UTF8", "--no-sync",
            user=True)  # fmt: skip
        with (primary_dir / "postgresql.conf").open("a") as conf:
            # The machine's other settings are PostgreSQL's defaults (shared_buffers 128 MB,
            # max_wal_size 1 GB, fsync and synchronous_commit on). Autovacuum off, as on the
            # machine's own cluster: a vacuum after a big delete would add WAL of its own.
            conf.write(f"""
listen_addresses = '{address}'
port = {port}
unix_socket_directories = '{primary_socket}'
wal_level = replica
max_wal_senders = 4
autovacuum = off
{settings}
""")
        (primary_dir / "pg_hba.conf").write_text(f"""\
local all all trust
local replication all trust
host all all {address}/30 trust
host replication all {address}/30 trust
""")
        start(bindir, primary_dir, base / "primary.log")
        primary = Node(primary_dir, primary_socket, port)
        pair = Pair(primary, Node(standby_dir, standby_socket, port), address, int(rate_mbit * 1_000_000))
        if prepare is not None:
            prepare(pair.primary_url())
        with connect(primary.url()) as conn:
            conn.execute("CHECKPOINT")
        run(str(bindir / "pg_basebackup"), "-h", str(primary_socket), "-p", str(port), "-U", OS_USER,
            "-D", str(standby_dir), "-C", "-S", SLOT, "-X", "stream", "--no-sync", user=True)  # fmt: skip
        with (standby_dir / "postgresql.conf").open("a") as conf:
            # Later lines win: the primary's own settings came with the base backup.
            conf.write(f"""
listen_addresses = ''
unix_socket_directories = '{standby_socket}'
primary_conninfo = 'host={address} port={port} user={OS_USER} application_name={STANDBY_NAME}'
primary_slot_name = '{SLOT}'
hot_standby = on
wal_receiver_status_interval = 1s
""")
        (standby_dir / "standby.signal").touch()
        shutil.chown(standby_dir / "standby.signal", OS_USER, OS_USER)
        start(bindir, standby_dir, base / "standby.log", namespace=namespace)
        deadline = time.monotonic() + 60
        with connect(primary.url()) as conn:
            while not conn.execute(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
                (STANDBY_NAME,),
            ).fetchone():
                if time.monotonic() > deadline:
                    log = (base / "standby.log").read_text()[-2000:]
                    raise RuntimeError(f"the standby did not start streaming within 60 s: {log}")
                time.sleep(0.1)
        pair.wait_caught_up()
        yield pair
    finally:
        stop(bindir, standby_dir)
        stop(bindir, primary_dir)
        if namespace_made:
            with contextlib.suppress(RuntimeError):
                run("ip", "netns", "delete", namespace)  # and the veth pair with it, and its qdisc
        with contextlib.suppress(RuntimeError):
            run("ip", "link", "delete", host_end)  # if the namespace never got its end
        shutil.rmtree(base, ignore_errors=True)
