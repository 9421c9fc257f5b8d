"""Heartbeat pings in the healthchecks.io convention: <url>/start, then <url>/<exit code>.

A ping is a courtesy to the monitor, never a reason for the cleanup to fail or wait:
the URL is checked once (a bad one is one warning and no pings), each ping has one
total deadline (connect, redirects, reply and its one quick retry: a monitor that
answers a byte at a time holds nobody), a redirect is followed only to http(s) (never
to ftp:// or file://), at most a few KiB of the reply are read, and every error is a
warning. The URL is a credential (anyone holding it can ping), so only its host is
ever logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from skybot_cleanup.errors import redact, url_key_parts
from skybot_cleanup.logs import get_logger
from skybot_cleanup.settings import Settings

ATTEMPTS = 2
# The monitor's reply is a word ("OK"): reading more only costs memory.
MAX_REPLY_BYTES = 4096
_warned_invalid = False


def reset() -> None:
    """Warn again (a new command in the same process)."""
    global _warned_invalid
    _warned_invalid = False


T = TypeVar("T")

if TYPE_CHECKING:
    import urllib.request


def check_url(template: str) -> str | None:
    """Why a ping URL template cannot work, or None when it can."""
    if any(character.isspace() or not character.isprintable() for character in template):
        return "it contains a space or a control character"
    try:
        parts = urlsplit(template.replace("{task}", "task"))
    except ValueError:  # an unbalanced [ in the host, say
        return "it is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "it has no http:// or https:// scheme"
    if not parts.hostname:
        return "it has no host"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "its port is not a number"
    return None


def warn_if_invalid(settings: Settings) -> None:
    """At load: one warning (the URL itself never shown) when pings cannot work."""
    global _warned_invalid
    if settings.ping_url is None or _warned_invalid:
        return
    problem = check_url(settings.ping_url.get_secret_value())
    if problem:
        _warned_invalid = True
        get_logger().warning(
            "ping_url_invalid",
            error=f"SKYBOT_CLEANUP_PING_URL is unusable: {problem}",
            hint="heartbeats are off; the cleanup runs as usual",
        )


class RedirectRefused(OSError):
    """A monitor redirected a request away from HTTP (ftp://, file://): not followed."""


@cache
def _http_only_redirects() -> type:
    import urllib.request  # only when there is something to send

    class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        """Follows a redirect only to http:// or https://. urllib's own follows ftp://
        (and names a refused file:// target, whole, in its error)."""

        def http_error_302(self, req, fp, code, msg, headers):  # type: ignore[no-untyped-def]
            target = headers.get("location") or headers.get("uri") or ""
            scheme = urlsplit(urljoin(req.full_url, target)).scheme.lower()
            if scheme not in ("http", "https"):
                fp.close()
                raise RedirectRefused(
                    f"redirected to {scheme}://, which is not followed (only http:// and https:// are)"
                )
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    return HttpOnlyRedirects


def open_url(request: urllib.request.Request, timeout: float) -> Any:
    """urlopen, following only http(s) redirects (pings and Pushgateway pushes)."""
    import urllib.request

    return urllib.request.build_opener(_http_only_redirects()).open(request, timeout=timeout)


def within(seconds: float, work: Callable[[], T]) -> T:
    """`work()`, or TimeoutError once `seconds` have passed, whatever it is waiting on (a
    reply that drips a byte at a time defeats a socket timeout). It runs in a daemon
    thread: a signal still reaches the caller while it waits."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run, daemon=True, name="ping")
    worker.start()
    worker.join(max(seconds, 0.0))
    if worker.is_alive():
        raise TimeoutError(f"no complete reply within {seconds:.1f} s")
    if failure:
        raise failure[0]
    return outcome[0]


@dataclass
class Pinger:
    url: str | None  # the task's ping base URL; None: pings off
    host: str = ""
    run_id: str = ""
    timeout_s: float = 5.0  # one deadline for each ping, its retry included

    @classmethod
    def from_settings(cls, settings: Settings, task: str, run_id: str, *, enabled: bool = True) -> Pinger:
        if settings.ping_url is None or not enabled:
            return cls(None)
        template = settings.ping_url.get_secret_value()
        if check_url(template):
            warn_if_invalid(settings)  # once per process, not once per task of `all`
            return cls(None)
        return cls.for_task(template, task, run_id, settings.ping_timeout_s)

    @classmethod
    def for_task(cls, template: str, task: str, run_id: str, timeout_s: float) -> Pinger:
        url = template.replace("{task}", quote(task, safe="")).rstrip("/")
        return cls(url, host=urlsplit(url).hostname or "", run_id=run_id, timeout_s=timeout_s)

    def ping(self, suffix: str, body: str | None = None) -> bool:
        if self.url is None:
            return False
        import urllib.request  # only when there is a ping to send

        url = f"{self.url}/{suffix}?rid={self.run_id}"
        # check_url() let only http and https through.
        request = urllib.request.Request(  # noqa: S310
            url,
            data=body.encode() if body is not None else None,
            method="POST" if body is not None else "GET",
            headers={"User-Agent": "skybot-cleanup"},
        )
        deadline = time.monotonic() + self.timeout_s

        def send() -> bytes:
            left = max(deadline - time.monotonic(), 0.001)
            with open_url(request, timeout=left) as response:
                return bytes(response.read(MAX_REPLY_BYTES))

        for attempt in range(1, ATTEMPTS + 1):
            try:
                within(deadline - time.monotonic(), send)
                return True
            except Exception as exc:  # any failure: a warning, never the cleanup's problem
                get_logger().warning(
                    "ping_failed",
                    host=self.host,
                    suffix=suffix,
                    attempt=attempt,
                    error_class=type(exc).__name__,
                    error=redact(str(exc), (self.url, url, *url_key_parts(url))),
                )
                if isinstance(exc, RedirectRefused):
                    break  # it would be redirected again
            if attempt < ATTEMPTS and deadline - time.monotonic() > 0.5:
                time.sleep(0.5)
            elif time.monotonic() >= deadline:
                break
        return False


def ping_once(template: str, task: str, suffix: str, run_id: str, timeout_s: float, body: str | None = None) -> bool:
    """One ping outside a run (a command that could not start), same rules."""
    return Pinger.for_task(template, task, run_id, timeout_s).ping(suffix, body=body)
