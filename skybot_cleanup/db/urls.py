"""Database URLs as Render, Prisma and libpq write them, made into what psycopg accepts.

libpq parses the result itself, so every form it knows works: a socket directory as a
percent-encoded host or ?host=, several hosts with target_session_attrs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode

from skybot_cleanup.errors import ConfigError
from skybot_cleanup.registry import IDENTIFIER_PATTERN

# Query parameters Prisma understands and libpq rejects ("invalid URI query parameter").
PRISMA_ONLY_PARAMETERS = frozenset(
    {
        "schema",
        "connection_limit",
        "pool_timeout",
        "pgbouncer",
        "socket_timeout",
        "statement_cache_size",
        "max_connection_lifetime",
        "max_idle_connection_lifetime",
    }
)
# Prisma's TLS parameters, which mean something else (or nothing) to libpq.
PRISMA_TLS_PARAMETERS = frozenset({"sslaccept", "sslcert", "sslidentity", "sslpassword"})
# Prisma's default when a URL has no ?schema=: the app's tables are in "public".
PRISMA_DEFAULT_SCHEMA = "public"


@dataclass(frozen=True)
class DatabaseTarget:
    """Where to connect, normalised, plus what the URL's Prisma parameters meant."""

    kind: Literal["postgresql", "sqlite"]
    conninfo: str  # a libpq URI for psycopg, or a SQLAlchemy sqlite URL
    schema: str | None  # PostgreSQL: the app's schema, always named (Prisma's default: public)
    display: str  # for messages: the password masked
    secrets: tuple[str, ...] = field(default=(), repr=False)
    # Which database a spooled run belongs to: user and database name (host and port may
    # be what was wrong when it failed), or the file of a SQLite database.
    identity: str = ""

    @property
    def is_postgres(self) -> bool:
        return self.kind == "postgresql"


_AUTHORITY = re.compile(r"^(?:(?P<userinfo>[^/?]*)@)?(?P<hosts>[^@/?]*)(?P<path>/[^?]*)?(?:\?(?P<query>.*))?$", re.S)


def parse_database_url(raw: str | None, schema_override: str | None = None) -> DatabaseTarget:
    if not raw or not raw.strip():
        raise ConfigError("no database URL: set DATABASE_URL or SKYBOT_CLEANUP_DATABASE_URL, or pass --database-url")
    raw = raw.strip()
    scheme, sep, rest = raw.partition("://")
    scheme = scheme.lower().split("+")[0]
    # No message quotes the URL, nor any part of it: it may come from a file, and the
    # wrong file (an env file, /proc/self/environ) would be shown to whoever reads the logs.
    if not sep:
        raise ConfigError("DATABASE_URL is not a valid database URL (expected scheme://...)")
    if scheme == "sqlite":
        return _sqlite_target(raw)
    if scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            "DATABASE_URL has a scheme that is not supported (not shown): use postgres://, postgresql:// or sqlite:///"
        )
    return _postgres_target(rest, schema_override)


def _sqlite_target(raw: str) -> DatabaseTarget:
    import sqlalchemy as sa

    try:
        path = sa.make_url(raw).database or ""
    except (ValueError, sa.exc.ArgumentError):
        raise ConfigError("DATABASE_URL is not a valid sqlite:/// URL") from None
    return DatabaseTarget(
        kind="sqlite",
        conninfo=raw,
        schema=None,
        display=raw,
        identity=f"sqlite:{os.path.abspath(path) if path else ':memory:'}",
    )


@dataclass(frozen=True)
class _Parts:
    user: str
    password: str
    hosts: str
    path: str
    parameters: list[tuple[str, str]]

    @property
    def values(self) -> dict[str, str]:
        return dict(self.parameters)


# Characters a URL's userinfo cannot hold unencoded: each ends it early somewhere, and
# the rest of the password would then be read as a host, a path or a query, and shown.
_RESERVED_IN_USERINFO = "/?#@[]"


def _userinfo_end(rest: str) -> int:
    """Where the userinfo ends (its "@"), or -1: normally the last "@" before the path or
    query; failing that, a later "@" after a "user:password" that holds a / ? or #."""
    boundary = min((index for index in (rest.find(character) for character in "/?#") if index >= 0), default=len(rest))
    at = rest.rfind("@", 0, boundary)
    if at < 0:
        at = rest.rfind("@")
        if at >= 0 and ":" not in rest[:at]:  # an "@" in a database name or a query value
            at = -1
    return at


def _split(rest: str) -> _Parts:
    end = _userinfo_end(rest)
    if end >= 0 and any(character in rest[:end] for character in _RESERVED_IN_USERINFO):
        raise ConfigError(
            "DATABASE_URL: its user or password holds an unencoded / ? # @ [ or ] (not shown): percent-encode "
            "them (/ is %2F, ? %3F, # %23, @ %40, [ %5B, ] %5D), or leave the password out of the URL and "
            "give it in PGPASSWORD or a ~/.pgpass file"
        )
    match = _AUTHORITY.match(rest)
    if match is None:
        raise ConfigError("DATABASE_URL is not a valid database URL")
    userinfo, hosts, path, query = (match.group(name) or "" for name in ("userinfo", "hosts", "path", "query"))
    user, _, password = userinfo.partition(":")
    if re.search(r":(?!\d*(,|$))", hosts.split("]")[-1]):
        raise ConfigError("DATABASE_URL is not a valid database URL (bad port)")
    return _Parts(unquote(user), unquote(password), hosts, path, parse_qsl(query, keep_blank_values=True))


def _host_of(entry: str) -> str:
    """The host of one entry of a URL's host list, without its port."""
    if entry.startswith("["):
        return entry[1:].partition("]")[0]
    return entry.partition(":")[0]


def _names_its_server(parts: _Parts) -> None:
    """libpq fills what a URL leaves out from the environment and the OS user: the local
    socket, and a database named after that user. A run must never reach a database by
    accident, so a URL names both its server and its database, and every host it lists
    (postgresql://user@:5432/db, h1,:5433 and ?host=h1, leave one empty)."""
    values = parts.values
    named = values.get("host", parts.hosts)  # libpq: the query's host wins
    hosts = [_host_of(entry) for entry in named.split(",")] if named else []
    if hosts and not all(hosts) and not values.get("hostaddr"):
        raise ConfigError(
            "DATABASE_URL leaves a host empty (a port with no host before it, or an empty entry in a list of "
            "hosts), which libpq would take as the local socket: name every host, as in "
            "postgresql://user@db.internal:5432/app, or a socket directory as ?host=/var/run/postgresql"
        )
    missing = [
        what
        for what, given in (
            (
                "host (or a socket directory as ?host=)",
                any(hosts) or values.get("hostaddr"),
            ),
            ("database", unquote(parts.path.lstrip("/")) or values.get("dbname")),
        )
        if not given
    ]
    if missing:
        raise ConfigError(
            f"DATABASE_URL names no {' and no '.join(missing)}: give both, as in "
            "postgresql://user@db.internal:5432/app (a password may come from PGPASSWORD or ~/.pgpass)"
        )


def _postgres_target(rest: str, schema_override: str | None) -> DatabaseTarget:
    parts = _split(rest)
    _names_its_server(parts)
    values = parts.values
    schema = schema_override or values.get("schema") or PRISMA_DEFAULT_SCHEMA
    if not re.match(IDENTIFIER_PATTERN, schema):
        raise ConfigError("the URL's ?schema= is not a valid schema name")
    tls = _tls_parameters(values)
    replaced = {key for key, _ in tls} | PRISMA_ONLY_PARAMETERS | PRISMA_TLS_PARAMETERS
    kept = [(k, v) for k, v in parts.parameters if k not in replaced] + tls
    user = quote(parts.user, safe="")
    credentials = user + (":" + quote(parts.password, safe="") if parts.password else "")
    shown_credentials = user + (":***" if parts.password else "")
    conninfo = f"postgresql://{credentials + '@' if credentials else ''}{parts.hosts}{parts.path}"
    display = f"postgresql://{shown_credentials + '@' if credentials else ''}{parts.hosts}{parts.path}"
    if kept:
        # quote, not urlencode's default quote_plus: libpq reads "+" as a plus, not a space.
        conninfo += "?" + urlencode(kept, quote_via=quote)
        display += "?" + urlencode([(k, "***" if k == "password" else v) for k, v in kept], safe="*/", quote_via=quote)
    password = parts.password
    secrets = tuple(secret for secret in {password, quote(password, safe=""), values.get("password", "")} if secret)
    database = values.get("dbname") or unquote(parts.path.lstrip("/")) or parts.user
    return DatabaseTarget(
        kind="postgresql",
        conninfo=conninfo,
        schema=schema,
        display=display,
        secrets=secrets,
        identity=f"postgresql:{values.get('user') or parts.user}@{database}",
    )


def _tls_parameters(values: Mapping[str, str]) -> list[tuple[str, str]]:
    """Prisma's TLS parameters in libpq's terms, never with less verification than asked.

    Prisma: sslaccept=strict verifies the server's certificate (and host name);
    sslcert is the CA or server certificate to trust (libpq's sslrootcert);
    sslidentity/sslpassword is a PKCS#12 client identity, which libpq cannot read.
    With sslkey present, sslcert keeps libpq's meaning (a client certificate).
    """
    accept = values.get("sslaccept", "").lower()
    if accept not in ("", "strict", "accept_invalid_certs"):
        raise ConfigError("DATABASE_URL: its sslaccept (not shown) is not strict or accept_invalid_certs")
    if "sslidentity" in values:
        raise ConfigError(
            "DATABASE_URL: sslidentity (a PKCS#12 client identity) has no libpq equivalent; convert it "
            "(openssl pkcs12 -in ID.p12 -clcerts -nokeys -out client.crt; openssl pkcs12 -in ID.p12 "
            "-nocerts -nodes -out client.key) and give sslcert=client.crt&sslkey=client.key instead"
        )
    added: list[tuple[str, str]] = []
    trust = values.get("sslcert") if "sslkey" not in values else None
    if "sslkey" in values and "sslcert" in values:
        added.append(("sslcert", values["sslcert"]))
    if trust:
        added.append(("sslrootcert", trust))
    if accept == "strict":
        mode = values.get("sslmode", "prefer").lower()
        if mode in ("disable", "allow"):
            raise ConfigError(
                f"DATABASE_URL: sslaccept=strict asks for a verified TLS connection, but sslmode={mode} allows none"
            )
        if not trust and "sslrootcert" not in values:
            added.append(("sslrootcert", "system"))  # Prisma trusts the system's CAs
        added.append(("sslmode", "verify-full"))
    return added
