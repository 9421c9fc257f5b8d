"""The app, as the benchmarks run it beside each method.

`Writer` is a light stand-in (an insert and a refresh ~100 times a second, the data modes').
`AppLoad` is the app's real statements, in the shape Prisma sends them (autocommit, no
transactions), from paced threads at the production mix or a revoke-heavy one, recording
per statement kind the latency and the errors by SQLSTATE (the `coexist` mode's).
`LockSampler` counts the statements seen waiting for a lock.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from benchmarks.databases import admin
from benchmarks.measure import percentile


class Writer(threading.Thread):
    """The app: inserts a live token and refreshes another, ~100 times a second."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.latencies_ms: list[float] = []

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            i = 0
            while not self.stop.is_set():
                i += 1
                statements = (
                    (
                        """INSERT INTO "RefreshToken" (id, token, "userAccountId", "accountId", "expiresAt",
                                                   "updatedAt")
                        VALUES (%s, %s, 'ua_1', 'acc_2', now() AT TIME ZONE 'UTC' + interval '7 days',
                                now() AT TIME ZONE 'UTC')""",
                        (f"w{uuid.uuid4().hex[:24]}", uuid.uuid4().hex * 2),
                    ),
                    (
                        """UPDATE "RefreshToken" SET "lastUsedAt" = now() AT TIME ZONE 'UTC'
                        WHERE id = (SELECT id FROM "RefreshToken" WHERE "expiresAt" > now() AT TIME ZONE 'UTC'
                                    ORDER BY "expiresAt" DESC LIMIT 1 OFFSET %s)""",
                        (i % 500,),
                    ),
                )
                for sql, params in statements:
                    started = time.perf_counter()
                    conn.execute(sql, params)
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                time.sleep(0.01)


# -- the app's own statements ------------------------------------------------------------------

APP_NAME = "skybot-bench-app"


def returning(table: str, columns: str) -> str:
    """Prisma's column list: every scalar column, qualified."""
    return ", ".join(f'"public"."{table}"."{column}"' for column in columns.split())


RT = returning(
    "RefreshToken",
    "id token userAccountId accountId ipAddress userAgent deviceInfo expiresAt revokedAt revokedReason "
    "lastUsedAt createdAt updatedAt",
)
IK = returning(
    "IdempotencyKey", "id key accountId endpoint method requestBody statusCode responseBody createdAt expiresAt"
)
ML = returning("MagicLink", "id email token used expiresAt createdAt")
# The statements as Prisma 6/7 sends them (see docs on the app's queries): each its own
# autocommit statement, parameters bound, LIMIT/OFFSET as parameters.
APP_SQL = {
    "refresh: select token": f"""SELECT {RT} FROM "public"."RefreshToken"
        WHERE ("public"."RefreshToken"."token" = %s AND 1=1) LIMIT %s OFFSET %s""",
    "refresh: select user": """SELECT "public"."UserAccount"."id", "public"."UserAccount"."accountId"
        FROM "public"."UserAccount" WHERE "public"."UserAccount"."id" IN (%s) OFFSET %s""",
    "refresh: select account": """SELECT "public"."Account"."id" FROM "public"."Account"
        WHERE "public"."Account"."id" IN (%s) OFFSET %s""",
    "refresh: update": f"""UPDATE "public"."RefreshToken" SET "lastUsedAt" = %s, "updatedAt" = %s
        WHERE ("public"."RefreshToken"."id" = %s AND 1=1) RETURNING {RT}""",
    "login: insert": f"""INSERT INTO "public"."RefreshToken" ("id", "token", "userAccountId", "accountId",
        "ipAddress", "userAgent", "deviceInfo", "expiresAt", "lastUsedAt", "createdAt", "updatedAt")
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {RT}""",
    "logout: select": f"""SELECT {RT} FROM "public"."RefreshToken"
        WHERE ("public"."RefreshToken"."token" = %s AND 1=1) LIMIT %s OFFSET %s""",
    "logout: update": f"""UPDATE "public"."RefreshToken" SET "revokedAt" = %s, "revokedReason" = %s,
        "updatedAt" = %s WHERE ("public"."RefreshToken"."id" = %s AND 1=1) RETURNING {RT}""",
    "logout-all: update": """UPDATE "public"."RefreshToken" SET "revokedAt" = %s, "revokedReason" = %s,
        "updatedAt" = %s WHERE ("public"."RefreshToken"."userAccountId" = %s
        AND "public"."RefreshToken"."revokedAt" IS NULL)""",
    "idempotency: select": f"""SELECT {IK} FROM "public"."IdempotencyKey"
        WHERE ("public"."IdempotencyKey"."key" = %s AND 1=1) LIMIT %s OFFSET %s""",
    "idempotency: insert": f"""INSERT INTO "public"."IdempotencyKey" ("id", "key", "accountId", "endpoint", "method",
        "requestBody", "statusCode", "responseBody", "createdAt", "expiresAt")
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {IK}""",
    "idempotency: update": f"""UPDATE "public"."IdempotencyKey" SET "statusCode" = %s, "responseBody" = %s
        WHERE ("public"."IdempotencyKey"."key" = %s AND 1=1) RETURNING {IK}""",
    "idempotency: replay": f"""SELECT {IK} FROM "public"."IdempotencyKey"
        WHERE ("public"."IdempotencyKey"."key" = %s AND 1=1) LIMIT %s OFFSET %s""",
    "magic-link: insert": f"""INSERT INTO "public"."MagicLink" ("id", "email", "token", "used", "expiresAt",
        "createdAt") VALUES (%s, %s, %s, %s, %s, %s) RETURNING {ML}""",
    "magic-link: select": f"""SELECT {ML} FROM "public"."MagicLink" WHERE ("public"."MagicLink"."email" = %s
        AND "public"."MagicLink"."token" = %s AND "public"."MagicLink"."used" = %s) LIMIT %s OFFSET %s""",
    "magic-link: update": f"""UPDATE "public"."MagicLink" SET "used" = %s
        WHERE ("public"."MagicLink"."id" = %s AND 1=1) RETURNING {ML}""",
}

# Requests a second, by kind, and the threads (connections) that send them. The shares
# are the app report's estimate (refresh 60 %, idempotency 20 %, login 5 %, logout 3 %,
# logout-all and magic links 1 % each), scaled to ~115 requests a second in all.
REALISTIC: dict[str, tuple[float, int]] = {
    kind: (share * 115 / 90, threads)
    for kind, share, threads in (
        ("refresh", 60, 4),
        ("idempotency", 20, 2),
        ("login", 5, 1),
        ("logout", 3, 1),
        ("logout-all", 1, 1),
        ("magic-link", 1, 1),
    )
}
# A security incident or a password-reset wave: ~100 logout-alls a second, each locking
# a user's hundreds of unrevoked rows across the heap, beside the realistic mix.
RATES: dict[str, dict[str, tuple[float, int]]] = {
    "realistic": REALISTIC,
    "revoke-heavy": {**REALISTIC, "logout-all": (100 + REALISTIC["logout-all"][0], 4)},
}
USERS = 2000


def utc() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def live_token(g: int) -> str:
    """The token of seeded live row g, as LAYOUT_SEED computes it."""
    return hashlib.sha256(f"{g}live".encode()).hexdigest()


def app_id() -> str:
    # 'w' like the Writer's rows, so the checks can leave the app's own rows out.
    return f"w{uuid.uuid4().hex[:24]}"


class AppLoad:
    """The app's requests from paced threads, one autocommit connection each, recording
    every statement's latency and every error's SQLSTATE by statement kind."""

    def __init__(self, url: str, rates: dict[str, tuple[float, int]], live: int):
        self.url, self.rates, self.live = url, rates, live
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.latencies_ms: dict[str, list[float]] = {kind: [] for kind in APP_SQL}
        self.errors: dict[str, Counter[str]] = {kind: Counter() for kind in APP_SQL}
        self.requests: Counter[str] = Counter()
        self.threads = [
            threading.Thread(target=self.run, args=(kind, rate / threads, seed), daemon=True)
            for kind, (rate, threads) in rates.items()
            for seed in range(threads)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join()

    def run(self, kind: str, rate: float, seed: int) -> None:
        request = getattr(self, kind.replace("-", "_"))
        rng = random.Random(f"{kind}/{seed}")
        interval = 1 / rate
        # prepare_threshold=None: never prepared, as adapter-pg sends them (unnamed statements).
        with psycopg.connect(
            self.url, autocommit=True, prepare_threshold=None, application_name=f"{APP_NAME}/{kind}"
        ) as conn:
            next_at = time.monotonic() + rng.random() * interval
            while not self.stop_event.wait(max(0.0, next_at - time.monotonic())):
                request(conn, rng)
                with self.lock:
                    self.requests[kind] += 1
                # Paced, not as fast as possible: a request held by a lock delays this
                # thread's next ones, but a long stall is not made up in a burst.
                next_at = max(next_at + interval, time.monotonic() - 1)

    def execute(self, conn: psycopg.Connection[Any], kind: str, params: tuple[Any, ...]) -> list[Any] | None:
        """One statement, timed; None when it failed (the error counted by SQLSTATE)."""
        started = time.perf_counter()
        try:
            cursor = conn.execute(APP_SQL[kind], params)
            rows = cursor.fetchall() if cursor.description else []
        except psycopg.Error as exc:
            with self.lock:
                self.errors[kind][exc.sqlstate or type(exc).__name__] += 1
            return None
        elapsed = (time.perf_counter() - started) * 1000
        with self.lock:
            self.latencies_ms[kind].append(elapsed)
        return rows

    # -- the requests: the statements each sends, in order ------------------------------------

    def refresh(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        rows = self.execute(conn, "refresh: select token", (live_token(rng.randint(1, self.live)), 1, 0))
        if not rows:
            return
        token = rows[0]
        users = self.execute(conn, "refresh: select user", (token[2], 0))
        if users:
            self.execute(conn, "refresh: select account", (users[0][1], 0))
        if token[8] is None and token[7] > utc():  # revoked or expired: 401 in app code, no UPDATE
            now = utc()
            self.execute(conn, "refresh: update", (now, now, token[0]))

    def login(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        user = rng.randint(1, USERS)
        now = utc()
        lifetime = timedelta(days=3) if rng.random() < 0.3 else timedelta(hours=12)  # remember me, or not
        device = Jsonb({"browser": "Safari", "os": "iOS", "device": "iPhone"})
        params = (app_id(), uuid.uuid4().hex * 2, f"ua_{user}", f"acc_{user % 200 + 1}", "203.0.113.7",
                  "Mozilla/5.0", device, now + lifetime, now, now, now)  # fmt: skip
        self.execute(conn, "login: insert", params)

    def logout(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        rows = self.execute(conn, "logout: select", (live_token(rng.randint(1, self.live)), 1, 0))
        if rows:
            now = utc()
            self.execute(conn, "logout: update", (now, "user_logout", now, rows[0][0]))

    def logout_all(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        now = utc()
        self.execute(conn, "logout-all: update", (now, "user_logout_all", now, f"ua_{rng.randint(1, USERS)}"))

    def idempotency(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        key, account, now = uuid.uuid4().hex, f"acc_{rng.randint(1, 200)}", utc()
        if self.execute(conn, "idempotency: select", (key, 1, 0)) != []:
            return
        body = Jsonb({"conversationId": f"conv_{rng.randint(1, 5000)}", "text": "x" * 80})
        params = (app_id(), key, account, "/api/messages", "POST", body, None, Jsonb(None),
                  now, now + timedelta(hours=24))  # fmt: skip
        if self.execute(conn, "idempotency: insert", params) is None:
            return
        response = Jsonb({"id": f"msg_{uuid.uuid4().hex[:12]}", "status": "sent"})
        self.execute(conn, "idempotency: update", (201, response, key))
        self.execute(conn, "idempotency: replay", (key, 1, 0))  # the client retries: the cached response

    def magic_link(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        email, token, now = f"user{rng.randint(1, USERS)}@example.com", os.urandom(32).hex(), utc()
        self.execute(conn, "magic-link: insert", (app_id(), email, token, False, now + timedelta(minutes=15), now))
        rows = self.execute(conn, "magic-link: select", (email, token, False, 1, 0))
        if rows:
            self.execute(conn, "magic-link: update", (True, rows[0][0]))

    def summary(self, seconds: float) -> dict[str, Any]:
        statements = {
            kind: {
                "count": len(values),
                "errors": dict(self.errors[kind]),
                "p50_ms": percentile(values, 50) if values else None,
                "p99_ms": percentile(values, 99) if values else None,
                "max_ms": max(values) if values else None,
            }
            for kind, values in self.latencies_ms.items()
        }
        errors = sum((Counter(counts) for counts in self.errors.values()), Counter())
        return {
            "seconds": seconds,
            "requests": dict(self.requests),
            "statements": statements,
            "errors": dict(errors),
            "deadlocks": errors.get("40P01", 0),
            # Every latency, to 0.1 ms, as {latency: requests}: pooled over repetitions when
            # printed, and small enough to keep in the results.
            "latency_counts_ms": {
                kind: dict(sorted(Counter(round(value, 1) for value in values).items()))
                for kind, values in self.latencies_ms.items()
            },
        }


class LockSampler(threading.Thread):
    """Every 50 ms, the backends of one database waiting for a lock: each statement seen
    waiting counts once, by its (pid, query_start), the app's by request kind."""

    def __init__(self, admin_url: str, database: str):
        super().__init__(daemon=True)
        self.admin_url, self.database, self.stop = admin_url, database, threading.Event()
        self.seen: set[tuple[int, datetime, str]] = set()

    def run(self) -> None:
        with admin(self.admin_url) as conn:
            while not self.stop.wait(0.05):
                rows = conn.execute(
                    """SELECT pid, query_start, application_name FROM pg_stat_activity
                       WHERE datname = %s AND wait_event_type = 'Lock' AND backend_type = 'client backend'""",
                    (self.database,),
                ).fetchall()
                self.seen.update((pid, started, name) for pid, started, name in rows)

    def summary(self) -> dict[str, Any]:
        app = Counter(name.split("/", 1)[1] for _, _, name in self.seen if name.startswith(f"{APP_NAME}/"))
        return {
            "lock_waits": sum(app.values()),
            "lock_waits_by_request": dict(app),
            "deletion_lock_waits": sum(1 for _, _, name in self.seen if not name.startswith(f"{APP_NAME}/")),
        }
