"""A network path with a fixed delay, for the tests and the `remote` benchmark: a TCP proxy
that holds every chunk for half the round-trip time in each direction and counts the turns
of each conversation.

A round trip is counted each time the client speaks after the server has (and once for
the client's first words on a connection, which stand for the TCP and startup exchange):
that is when a client that waits for its answer pays the delay. PostgreSQL's protocol is
strictly request and answer, so several statements the client sends in one go (a
pipeline, or several in one simple-protocol message) are one turn.

This kernel has tbf but not netem, hence a proxy for delay rather than a qdisc.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Conversation:
    """One client connection through the proxy."""

    round_trips: int = 0
    client_bytes: int = 0
    server_bytes: int = 0
    last_speaker: str | None = None
    turns: list[bytes] = field(default_factory=list)  # the first bytes the client sent in each turn


@dataclass
class Counts:
    connections: int
    round_trips: int
    per_connection: list[int] = field(default_factory=list)


class DelayProxy:
    """Listens on 127.0.0.1 (an ephemeral port) and forwards to `target`: (host, port), or
    a unix socket path. Use as a context manager; `counts()` and `reset()` between runs."""

    def __init__(self, target: tuple[str, int] | str, delay_s: float):
        self.target = target
        self.delay_s = delay_s
        self.port = 0
        self.conversations: list[Conversation] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- the running proxy -------------------------------------------------------------

    def __enter__(self) -> DelayProxy:
        self._thread = threading.Thread(target=self._serve, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the delay proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._server = loop.run_until_complete(asyncio.start_server(self._accept, sock=sock))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                server_reader, server_writer = await asyncio.open_unix_connection(self.target)
            else:
                server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, server_writer):
            with contextlib.suppress(OSError):
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        talk = Conversation()
        with self._lock:
            self.conversations.append(talk)
        await asyncio.gather(
            self._pump(client_reader, server_writer, talk, "client"),
            self._pump(server_reader, client_writer, talk, "server"),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, talk: Conversation, speaker: str
    ) -> None:
        """Forward one direction, each chunk half the delay late, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        writer.close()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        half = self.delay_s / 2
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except (OSError, ConnectionError):
                    data = b""
                with self._lock:
                    if data:
                        if speaker == "client":
                            talk.client_bytes += len(data)
                            if talk.last_speaker != "client":
                                talk.round_trips += 1
                                talk.turns.append(data[:60])
                        else:
                            talk.server_bytes += len(data)
                        talk.last_speaker = speaker
                await queue.put((time.monotonic() + half, data))
                if not data:
                    break
        finally:
            await delivering

    # -- reading it --------------------------------------------------------------------

    def counts(self) -> Counts:
        with self._lock:
            per = [talk.round_trips for talk in self.conversations if talk.client_bytes]
        return Counts(connections=len(per), round_trips=sum(per), per_connection=per)

    def reset(self) -> None:
        with self._lock:
            self.conversations = []

    def libpq_url(self, url: str) -> str:
        """`url` (postgresql://user@host:port/db?…, or a unix-socket URL with ?host=DIR)
        pointed at the proxy instead."""
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        parts = urlsplit(url)
        query = [(key, value) for key, value in parse_qsl(parts.query) if key not in ("host", "port")]
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


def server_address(url: str) -> tuple[str, int] | str:
    """Where a libpq URL's server listens: (host, port), or its unix socket's path."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = (query.get("host") or [parts.hostname or "/var/run/postgresql"])[0]
    port = int(query["port"][0]) if query.get("port") else parts.port or 5432
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return (host, port)


@contextmanager
def delayed(url: str, delay_s: float) -> Iterator[tuple[DelayProxy, str]]:
    """A proxy in front of `url`'s server, and the URL through it."""
    with DelayProxy(server_address(url), delay_s) as proxy:
        yield proxy, proxy.libpq_url(url)
