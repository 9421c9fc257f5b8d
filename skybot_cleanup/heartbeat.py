"""Heartbeat pings in the healthchecks.io convention: <url>/start, then <url>/<exit code>.

A ping is a courtesy to the monitor, never a reason for the cleanup to fail or wait:
short timeout, one quick retry, every error swallowed and logged.
"""

from __future__ import annotations

import time
import urllib.request

from skybot_cleanup.errors import redact
from skybot_cleanup.logs import get_logger

TIMEOUT_S = 5
ATTEMPTS = 2


def ping(url_template: str, task: str, suffix: str, run_id: str, body: str | None = None) -> bool:
    url = f"{url_template.replace('{task}', task).rstrip('/')}/{suffix}?rid={run_id}"
    request = urllib.request.Request(url, data=body.encode() if body is not None else None,
                                     method="POST" if body is not None else "GET",
                                     headers={"User-Agent": "skybot-cleanup"})
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                response.read()
            return True
        except Exception as exc:
            # The URL itself is a credential (anyone holding it can ping): never log it.
            get_logger().warning("ping_failed", suffix=suffix, attempt=attempt, error_class=type(exc).__name__,
                                 error=redact(str(exc), (url_template,)))
            if attempt < ATTEMPTS:
                time.sleep(0.5)
    return False
