"""Heartbeat pings in the healthchecks.io convention: <url>/start, then <url>/<exit code>.

A ping is a courtesy to the monitor, never a reason for the cleanup to fail or wait:
the URL is checked once (a bad one is one warning and no pings), each ping has a
short timeout and one quick retry, and every error is a warning. The URL is a
credential (anyone holding it can ping), so only its host is ever logged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from skybot_cleanup.errors import redact
from skybot_cleanup.logs import get_logger
from skybot_cleanup.settings import CleanupSettings

TIMEOUT_S = 5
ATTEMPTS = 2
_warned_invalid = False


def check_url(template: str) -> str | None:
    """Why a ping URL template cannot work, or None when it can."""
    if any(character.isspace() for character in template):
        return "it contains a space"
    parts = urlsplit(template.replace("{task}", "task"))
    if parts.scheme not in ("http", "https"):
        return "it has no http:// or https:// scheme"
    if not parts.hostname:
        return "it has no host"
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "its port is not a number"
    return None


def warn_if_invalid(settings: CleanupSettings) -> None:
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


@dataclass
class Pinger:
    url: str | None  # the task's ping base URL; None: pings off
    host: str = ""
    run_id: str = ""

    @classmethod
    def from_settings(cls, settings: CleanupSettings, task: str, run_id: str, *, enabled: bool = True) -> Pinger:
        if settings.ping_url is None or not enabled:
            return cls(None)
        template = settings.ping_url.get_secret_value()
        if check_url(template):
            warn_if_invalid(settings)  # once per process, not once per task of `all`
            return cls(None)
        url = template.replace("{task}", quote(task, safe="")).rstrip("/")
        return cls(url, host=urlsplit(url).hostname or "", run_id=run_id)

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
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
                    response.read()
                return True
            except Exception as exc:  # any failure: a warning, never the cleanup's problem
                get_logger().warning(
                    "ping_failed",
                    host=self.host,
                    suffix=suffix,
                    attempt=attempt,
                    error_class=type(exc).__name__,
                    error=redact(str(exc), (self.url, url, *self.url.split("/")[3:])),
                )
                if attempt < ATTEMPTS:
                    time.sleep(0.5)
        return False


def ping_once(template: str, task: str, suffix: str, run_id: str, body: str | None = None) -> bool:
    """One ping outside a run (a command that could not start), same rules."""
    url = template.replace("{task}", quote(task, safe="")).rstrip("/")
    return Pinger(url, host=urlsplit(url).hostname or "", run_id=run_id).ping(suffix, body=body)
