"""Real components for the tests that need them: PgBouncer, a TLS PostgreSQL cluster
with a hot standby, node_exporter. From Debian's packages (.ci/run installs them);
missing ones skip the tests, or fail them under CI.

Servers that refuse to run as root (PgBouncer, PostgreSQL) are started as an
unprivileged user through setpriv when the tests run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa
from helpers import unavailable

IS_ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def as_user(user: str, command: list[str]) -> list[str]:
    """`command` as `user` when we are root (setpriv, from util-linux)."""
    if not IS_ROOT:
        return command
    import pwd

    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--", *command]


def world_dir(prefix: str) -> Path:
    """A directory another OS user can use (pytest's tmp_path is private to us)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o777)
    return path


def executable(name: str, *candidates: str) -> str:
    for path in (shutil.which(name), *candidates):
        if path and Path(path).exists():
            return str(path)
    unavailable(f"{name} is not installed (Debian: apt-get install {name.replace('prometheus-', 'prometheus-')})")
    raise AssertionError  # unreachable


def need_root() -> None:
    """Running as another OS user (setpriv) needs root, and an interpreter others can run."""
    if not IS_ROOT:
        unavailable("running as another OS user needs root (setpriv)")
    # The interpreter the virtualenv links to must be reachable by other users: one
    # under /root (pyenv) is not, whatever a probe run may show on a machine that
    # papers over it (the sandboxed test then fails inside its exec).
    interpreter = Path(sys.executable).resolve()
    if any(not directory.stat().st_mode & 0o001 for directory in interpreter.parents):
        unavailable(
            f"{interpreter} cannot be run by another user (a directory on its path is closed to "
            "others): make the virtualenv from a system Python, as .ci/run does"
        )


# -- PgBouncer --------------------------------------------------------------------------------


@dataclass
class PgBouncer:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    def url(self, database: str, user: str = "postgres", **query: str) -> str:
        extra = "&".join(f"{key}={value}" for key, value in query.items())
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}" + (f"?{extra}" if extra else "")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_pgbouncer(server_url: str, pool_size: int, users: tuple[str, ...] = ("postgres",)) -> PgBouncer:
    """PgBouncer in transaction mode in front of the test server, `pool_size` server
    connections per database and user, and a short query_wait_timeout so that a
    deadlock shows as a failure within seconds."""
    binary = executable("pgbouncer", "/usr/sbin/pgbouncer")
    parts = urlsplit(server_url)
    host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
    server = f"host={host} port={parts.port or 5432} user={parts.username or 'postgres'}"
    directory = world_dir("skybot-pgbouncer-")
    port = free_port()
    (directory / "users.txt").write_text("".join(f'"{user}" ""\n' for user in users))
    (directory / "pgbouncer.ini").write_text(f"""\
[databases]
* = {server}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/users.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 200
query_wait_timeout = 30
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
""")
    for path in directory.iterdir():
        path.chmod(0o666)
    # PgBouncer will not run as root; through a unix socket it runs as the socket's owner.
    owner = "nobody"
    if host.startswith("/") and IS_ROOT:
        import pwd

        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name
        owner = "nobody" if owner == "root" else owner
    process = subprocess.Popen(
        as_user(owner, [binary, str(directory / "pgbouncer.ini")]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return PgBouncer(port, process, directory)


# -- a TLS cluster and its hot standby -------------------------------------------------------


def postgres_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        unavailable("PostgreSQL server binaries are not installed (Debian: apt-get install postgresql)")
    return Path(found[-1]).parent


@dataclass
class Cluster:
    port: int
    directory: Path
    socket_dir: Path
    ca: Path
    bindir: Path

    def stop(self) -> None:
        subprocess.run(
            as_user(
                "postgres", [str(self.bindir / "pg_ctl"), "-D", str(self.directory), "-m", "immediate", "-w", "stop"]
            ),
            capture_output=True,
            check=False,
        )

    def superuser_engine(self) -> sa.Engine:
        """The postgres superuser, over the cluster's Unix socket (trust)."""
        return sa.create_engine(
            f"postgresql+psycopg://postgres@/postgres?host={self.socket_dir}&port={self.port}",
            poolclass=sa.pool.NullPool,
        )

    def psql(self, sql: str, database: str = "postgres") -> str:
        completed = subprocess.run(
            as_user(
                "postgres",
                [
                    str(self.bindir / "psql"),
                    "-XAtq",
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                    "-d",
                    database,
                    "-c",
                    sql,
                ],
            ),
            capture_output=True,
            text=True,
            check=True,
        )
        return completed.stdout.strip()


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for "localhost" only."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=skybot test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"
    )
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    )
    return directory / "ca.pem", directory / "server.crt", directory / "server.key"


def start_cluster(password_role: str, password: str) -> Iterator[tuple[Cluster, Cluster]]:
    """A primary that only takes TLS connections over TCP (password auth for
    `password_role`), and a streaming hot standby of it."""
    bindir = postgres_bindir()
    if shutil.which("openssl") is None:
        unavailable("openssl is not installed")
    base = world_dir("skybot-tls-")
    ca, certificate, key = make_certificates(base)
    primary_dir, standby_dir = base / "primary", base / "standby"
    primary_dir.mkdir()
    if IS_ROOT:
        shutil.chown(primary_dir, "postgres", "postgres")
        for path in (certificate, key):
            shutil.chown(path, "postgres", "postgres")
    key.chmod(0o600)
    subprocess.run(
        as_user(
            "postgres",
            [
                str(bindir / "initdb"),
                "-D",
                str(primary_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        ),
        check=True,
        capture_output=True,
    )
    port, standby_port = free_port(), free_port()
    with (primary_dir / "postgresql.conf").open("a") as conf:
        conf.write(f"""
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{primary_dir}'
ssl = on
ssl_cert_file = '{certificate}'
ssl_key_file = '{key}'
wal_level = replica
max_wal_senders = 4
hot_standby = on
fsync = off
password_encryption = 'scram-sha-256'
""")
    (primary_dir / "pg_hba.conf").write_text(f"""\
local all all trust
local replication all trust
hostssl all {password_role} 127.0.0.1/32 scram-sha-256
hostssl all postgres 127.0.0.1/32 trust
hostnossl all all 127.0.0.1/32 reject
""")
    pg_ctl = str(bindir / "pg_ctl")
    subprocess.run(
        as_user("postgres", [pg_ctl, "-D", str(primary_dir), "-l", str(base / "primary.log"), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    primary = Cluster(port, primary_dir, primary_dir, ca, bindir)
    standby = None
    try:
        escaped = password.replace("'", "''")
        primary.psql(f"CREATE ROLE {password_role} LOGIN PASSWORD '{escaped}'")
        subprocess.run(
            as_user(
                "postgres",
                [
                    str(bindir / "pg_basebackup"),
                    "-h",
                    str(primary_dir),
                    "-p",
                    str(port),
                    "-U",
                    "postgres",
                    "-D",
                    str(standby_dir),
                    "-R",
                    "--no-sync",
                ],
            ),
            check=True,
            capture_output=True,
        )
        with (standby_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {standby_port}\nunix_socket_directories = '{standby_dir}'\n")
        subprocess.run(
            as_user("postgres", [pg_ctl, "-D", str(standby_dir), "-l", str(base / "standby.log"), "-w", "start"]),
            check=True,
            capture_output=True,
        )
        standby = Cluster(standby_port, standby_dir, standby_dir, ca, bindir)
        yield primary, standby
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()
        shutil.rmtree(base, ignore_errors=True)


# -- node_exporter ----------------------------------------------------------------------------


def scrape_node_exporter(textfile_dir: Path) -> str:
    """Debian's node_exporter, as its own user, reading a textfile directory once."""
    import urllib.request

    binary = executable("prometheus-node-exporter", "/usr/bin/prometheus-node-exporter")
    port = free_port()
    process = subprocess.Popen(
        as_user(
            "prometheus",
            [
                binary,
                f"--web.listen-address=127.0.0.1:{port}",
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={textfile_dir}",
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())
    finally:
        process.terminate()
        process.wait(timeout=10)
