"""The one module that reads configuration: CLI options, the environment, the
settings file, and the app's own variables, in that order of precedence.

The settings file (SKYBOT_CLEANUP_ENV_FILE, else ./.env) is read literally: KEY=value
lines, no interpolation and no escapes, so a password with `$`, `${HOME}`, `&`, `%`
or `#` arrives as written (python-dotenv, which pydantic-settings would use, expands
`${VAR}`). CRLF line ends, a UTF-8 BOM, `export ` prefixes and one pair of quotes
around a whole value are tolerated, because the app's own .env has them.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from skybot_cleanup.errors import ConfigError, ExitCode, remember_secrets, url_key_parts
from skybot_cleanup.registry import IDENTIFIER_PATTERN, REGISTRY, Registry, TableSpec, Task

if TYPE_CHECKING:  # the db layer loads SQLAlchemy: only for the commands that connect
    from skybot_cleanup import db

ENV_PREFIX = "SKYBOT_CLEANUP_"
# Where the settings file is, for cron and scripts (systemd passes the same file as EnvironmentFile).
ENV_FILE_VARIABLE = f"{ENV_PREFIX}ENV_FILE"
DEFAULT_BATCH_SIZE = 10_000
DAY_MS = 86_400_000


PATH_FIELDS = ("state_dir", "prom_file")


def is_usable_path(value: str) -> bool:
    return bool(value.strip()) and all(character.isprintable() for character in value)


class _Base(BaseSettings):
    # extra="ignore": the app's own .env holds dozens of variables that are not ours.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)


class _Connection(_Base):
    """Where the database is, and what every connection and transaction is given."""

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(f"{ENV_PREFIX}DATABASE_URL", "DATABASE_URL", "database_url"),
        description="Database to clean: postgres://, postgresql:// (Prisma query parameters allowed) "
        "or sqlite:///path. Falls back to the app's DATABASE_URL.",
    )
    schema_name: str | None = Field(
        default=None,
        pattern=IDENTIFIER_PATTERN,
        validation_alias=AliasChoices(f"{ENV_PREFIX}SCHEMA", "schema_name"),
        description="Schema holding the app's tables; overrides the URL's ?schema=. "
        "Default: the URL's schema, else public (as for Prisma). Tables are always schema-qualified.",
    )
    lock_timeout_ms: int = Field(
        default=5000,
        ge=0,
        le=DAY_MS,
        description="lock_timeout of each transaction: how long a statement waits for a row or table lock. "
        "Never more than a fifth of the server's deadlock_timeout (0: that cap), so the tool's wait ends "
        "before the deadlock detector could pick the app's statement.",
    )
    statement_timeout_ms: int = Field(
        default=600_000,
        ge=0,
        le=DAY_MS,
        description="statement_timeout of each transaction (0: no limit).",
    )
    idle_timeout_s: int = Field(
        default=60,
        ge=1,
        le=86_400,
        description="How long a run's transaction may sit idle before the server ends it, so a frozen "
        "run (SIGSTOP, a paused VM) frees its lock; at least 1 s above SLEEP_MS, at most MAX_RUNTIME_S.",
    )
    connect_timeout_s: int = Field(default=10, ge=1, le=300, description="Seconds to wait for a connection.")
    clock_skew_warning_s: float = Field(
        default=2.0,
        gt=0,
        le=86_400,
        description="Warn when this host's clock and the database server's differ by more than this many "
        "seconds. Runs always take the earlier of the two, so a clock that runs ahead never deletes a valid row.",
    )
    application_name: str = Field(
        default="skybot-cleanup",
        pattern=r"^[A-Za-z0-9 _.,:@/+-]{1,40}$",
        description="application_name shown in pg_stat_activity (the task name is appended).",
    )


class _Runs(_Base):
    """How a cleanup deletes: batches, caps, pace and retries."""

    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE,
        ge=1,
        le=1_000_000,
        description="Rows per committed batch (about: a batch of the heap walk covers the pages that hold about "
        "this many due rows). Each batch holds its row locks only until it commits.",
    )
    single_transaction: bool = Field(
        default=False,
        description="Delete every due row in one transaction instead of batches: all or nothing. Rows the app "
        "holds are skipped (counted in remaining) as in batches, but an app write to a row the run has deleted "
        "waits until the whole run commits (docs/operations.md).",
    )
    max_rows: int | None = Field(default=None, ge=1, le=10**12, description="Stop a run after this many rows.")
    max_runtime_s: float | None = Field(
        default=None,
        gt=0,
        le=604_800,
        description="Stop a run once it has run this long: between batches, and no statement outlives it.",
    )
    sleep_ms: int = Field(default=0, ge=0, le=600_000, description="Pause between batches, to spare a busy database.")
    max_replica_lag_s: float = Field(
        default=10.0,
        ge=0,
        le=86_400,
        description="Keep every streaming standby's replay lag under this many seconds: between batches, a "
        "batched run waits while a standby is behind, and paces itself to the slowest one's replay speed "
        "(0: off). Reading the lag needs pg_read_all_stats (or pg_monitor); the waiting counts against "
        "MAX_RUNTIME_S.",
    )
    max_retries: int = Field(
        default=3,
        ge=0,
        le=20,
        validation_alias=AliasChoices(f"{ENV_PREFIX}MAX_RETRIES", "JOB_MAX_RETRIES", "max_retries"),
        description="Retries of a transient database error (falls back to the app's JOB_MAX_RETRIES).",
    )
    retry_delay_ms: int = Field(
        default=5000,
        ge=0,
        le=600_000,
        validation_alias=AliasChoices(f"{ENV_PREFIX}RETRY_DELAY_MS", "JOB_RETRY_DELAY", "retry_delay_ms"),
        description="First retry delay, doubled each retry, with random jitter (falls back to the app's "
        "JOB_RETRY_DELAY).",
    )


class _Records(_Base):
    """What every run leaves behind, and what the tool trusts to keep it in."""

    history: bool = Field(
        default=True,
        description="Record every run and metrics snapshot in the tool's own tables (best effort).",
    )
    history_schema: str = Field(
        default="skybot_cleanup",
        pattern=IDENTIFIER_PATTERN,
        description="Schema of the history tables on PostgreSQL (a table prefix on SQLite), "
        "kept apart from the app's Prisma schema.",
    )
    history_retention_days: int = Field(default=30, ge=1, le=3650, description="Days of run history to keep.")
    history_owner: str | None = Field(
        default=None,
        pattern=IDENTIFIER_PATTERN,
        description="A role besides the tool's own that may own the history's schema and tables (one an "
        "administrator made them as). By default the tool writes and reads its history only where it is the owner.",
    )
    trusted_triggers: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_$, ]*$",
        description="Comma-separated names of triggers and rules, owned by other roles, that a run may fire "
        "although it holds privileges their owners lack (a superuser in DATABASE_URL, most often). Name one only "
        "once you have read its code; a least-privilege role needs none.",
    )
    state_dir: str | None = Field(
        default=None,
        description="Local directory for runs the database history could not take (recorded at the next "
        "run that can write). Default: $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/skybot-cleanup "
        "(~/.local/state/skybot-cleanup).",
    )
    grace_minutes: int = Field(
        default=30,
        ge=0,
        le=10_080,
        description="status: a task that has never run is PENDING until its first scheduled time after "
        "the tool was first seen on the database, plus this grace.",
    )
    idempotency_stuck_minutes: int = Field(
        default=10,
        ge=1,
        le=525_600,
        description="An idempotency key in progress (statusCode NULL) longer than this counts as stuck.",
    )
    backlog_warning_rows: int = Field(
        default=100_000,
        ge=1,
        le=10**12,
        description="check warns above this many due rows: run that task with --batch-size first.",
    )
    index_advice_rows: int = Field(
        default=100_000,
        ge=0,
        le=10**12,
        description="check advises an index (as a schema.prisma change) only for tables with at least "
        "this many rows; below it, an INFO line.",
    )
    prom_file: str | None = Field(
        default=None,
        description="node_exporter textfile(s): a directory (one file per task), or a path where {task} "
        "is replaced (without {task}, the task name is added before the extension).",
    )
    ping_url: SecretStr | None = Field(
        default=None,
        description="Heartbeat URL (healthchecks.io style); {task} is replaced. Pings <url>/start, "
        "then <url>/<exit code>. An invalid URL is a warning, never a failure.",
    )
    ping_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="The longest one heartbeat ping may take, connect, reply and its retry included: a slow "
        "monitor never holds a run longer.",
    )
    skipped_exit_code: int = Field(
        default=ExitCode.SKIPPED,
        ge=ExitCode.OK,
        le=ExitCode.SKIPPED,
        description=f"Exit code of a run skipped because another holds the task's lock: {ExitCode.SKIPPED}, or "
        f"{ExitCode.OK} for platforms that count any other code as a failure (Kubernetes, Render).",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="Log format on stderr: auto is JSON unless stderr is a terminal.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Lowest level logged.")
    syslog_prefix: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Start each log line on stderr with its syslog priority (`<3>` for an error, `<6>` for info), "
        "which journald and `logger --prio-prefix` read and strip: auto is on when stderr is systemd's journal "
        "(JOURNAL_STREAM); the generated crontab sets on.",
    )
    debug: bool = Field(
        default=False, description="Print a traceback for an unexpected error (read from the environment only)."
    )


class Settings(_Records, _Runs, _Connection):
    """Settings every registry has; table, column and retention settings are added
    per registry by `settings_model`."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load() resolves option > environment > settings file itself, so that
        # `config` can say where every value came from; the model only validates.
        return (init_settings,)

    @field_validator("skipped_exit_code")
    @classmethod
    def _skip_code(cls, value: int) -> int:
        if value not in (ExitCode.OK, ExitCode.SKIPPED):
            raise ValueError(f"must be {ExitCode.SKIPPED} or {ExitCode.OK}")
        return value

    @field_validator(*PATH_FIELDS)
    @classmethod
    def _a_path(cls, value: str | None) -> str | None:
        if value is not None and not is_usable_path(value):
            raise ValueError("must be a path, without NUL or other control characters")
        return value

    @field_validator("log_format", "log_level", "syslog_prefix", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.single_transaction and (self.max_rows is not None or self.max_runtime_s is not None):
            # A cap can only stop a run between batches.
            raise ValueError(
                f"{ENV_PREFIX}SINGLE_TRANSACTION cannot be combined with {ENV_PREFIX}MAX_ROWS or "
                f"{ENV_PREFIX}MAX_RUNTIME_S: a cap stops a run between batches"
            )
        if self.idle_timeout_s * 1000 < self.sleep_ms + 1000:
            raise ValueError(f"{ENV_PREFIX}IDLE_TIMEOUT_S must be at least 1 s more than {ENV_PREFIX}SLEEP_MS")
        return self

    # Typed access to the registry-driven fields.
    def table_name(self, table: TableSpec) -> str:
        return str(getattr(self, table_field(table)))

    def column_name(self, table: TableSpec, role: str) -> str:
        return str(getattr(self, column_field(table, role)))

    def retention_days(self, task: Task) -> int:
        assert task.retention is not None
        return int(getattr(self, task.retention.setting))

    @property
    def idle_timeout_ms(self) -> int:
        """Never longer than the run is allowed to take."""
        idle = self.idle_timeout_s * 1000
        if self.max_runtime_s is not None:
            idle = min(idle, max(int(self.max_runtime_s * 1000), self.sleep_ms + 1000))
        return idle

    @property
    def trusted_code(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.trusted_triggers.split(",") if name.strip())

    def secrets(self) -> tuple[str, ...]:
        found = [secret.get_secret_value() for secret in (self.database_url, self.ping_url) if secret]
        if self.ping_url:
            # The template itself never appears whole ({task} is filled in); its key does.
            found += [part for part in url_key_parts(self.ping_url.get_secret_value()) if "{task}" not in part]
        return tuple(found)

    def database_target(self) -> db.DatabaseTarget:
        """The configured database; raises ConfigError when there is none or it is malformed."""
        from skybot_cleanup.db.urls import parse_database_url

        url = self.database_url.get_secret_value() if self.database_url else None
        return parse_database_url(url, self.schema_name)

    def session(self) -> db.SessionSettings:
        from skybot_cleanup.db.connection import SessionSettings

        return SessionSettings(
            application_name=self.application_name,
            connect_timeout_s=self.connect_timeout_s,
            lock_timeout_ms=self.lock_timeout_ms,
            statement_timeout_ms=self.statement_timeout_ms,
            idle_timeout_ms=self.idle_timeout_ms,
        )

    def table_names(self, table: TableSpec) -> db.TableNames:
        """The table's configured names, with the variables that set them."""
        from skybot_cleanup.db.catalog import TableNames

        model = type(self)
        return TableNames(
            table=self.table_name(table),
            columns={role: self.column_name(table, role) for role in table.roles},
            table_variable=env_name(table_field(table), model),
            column_variables={role: env_name(column_field(table, role), model) for role in table.roles},
        )

    def all_table_names(self, registry: Registry = REGISTRY) -> dict[str, db.TableNames]:
        return {table.key: self.table_names(table) for table in registry.tables}


def table_field(table: TableSpec) -> str:
    return f"{table.key}_table"


def column_field(table: TableSpec, role: str) -> str:
    return f"{table.key}_{role}_column"


@cache
def settings_model(registry: Registry = REGISTRY) -> type[Settings]:
    """The settings class of a registry: its tables, columns and retentions are settings."""
    fields: dict[str, Any] = {}
    for table in registry.tables:
        fields[table_field(table)] = (
            str,
            Field(
                default=table.name, pattern=IDENTIFIER_PATTERN, description=f'Name of the app\'s "{table.name}" table.'
            ),
        )
        for role, column in table.roles.items():
            fields[column_field(table, role)] = (
                str,
                Field(
                    default=column.name,
                    pattern=IDENTIFIER_PATTERN,
                    description=f'Name of "{table.name}"."{column.name}".',
                ),
            )
    for task in registry.tasks:
        if task.retention is not None:
            fields[task.retention.setting] = (
                int,
                Field(default=task.retention.default_days, ge=1, le=36_500, description=task.retention.description),
            )
    return create_model("Settings", __base__=Settings, **fields)


DefaultSettings = settings_model()


def variable_names(model: type[Settings], name: str) -> list[str]:
    """The variables that set a field, ours first (SKYBOT_CLEANUP_MAX_RETRIES, JOB_MAX_RETRIES)."""
    alias = model.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str) and choice.isupper()]
    return [f"{ENV_PREFIX}{name.upper()}"]


def env_name(name: str, model: type[Settings] = DefaultSettings) -> str:
    """The variable named in messages and docs/configuration.md for a field."""
    return variable_names(model, name)[0]


# -- the settings file ------------------------------------------------------------------------


def read_env_file(path: Path, *, strict: bool) -> dict[str, str]:
    """KEY=value lines taken literally. `strict` (the file named by SKYBOT_CLEANUP_ENV_FILE)
    rejects a line that is not an assignment; the app's .env may hold multi-line values."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror}{_as_whom()}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"settings file {path} is not UTF-8 text") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum():
            if strict:
                raise ConfigError(f"settings file {path}, line {number}: expected KEY=value")
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def _as_whom() -> str:
    try:
        import pwd

        return f" (running as {pwd.getpwuid(os.geteuid()).pw_name})"
    except (ImportError, KeyError):  # pragma: no cover - not on Linux, or an unnamed uid
        return ""


# -- loading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: Literal["option", "environment", "settings file", "default"]
    variable: str | None = None

    def __str__(self) -> str:
        if self.kind == "option" and self.variable:
            return f"option ({self.variable})"
        if self.kind in ("option", "default"):
            return self.kind
        app = ", the app's variable" if self.variable in APP_VARIABLES else ""
        return f"{self.kind} ({self.variable}{app})"


@dataclass(frozen=True)
class LoadWarning:
    """Something found while reading the settings, logged once logging is configured."""

    event: str
    fields: dict[str, str]


@dataclass
class Loaded:
    settings: Settings
    env_file: Path | None
    sources: dict[str, Source] = field(default_factory=dict)
    unknown: list[tuple[str, str | None]] = field(default_factory=list)  # variable, closest real name
    warnings: list[LoadWarning] = field(default_factory=list)


# Variables of the app's that we read as fallbacks (reported as such by `config`).
APP_VARIABLES = {"DATABASE_URL", "JOB_MAX_RETRIES", "JOB_RETRY_DELAY"}


def load(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    registry: Registry = REGISTRY,
) -> Loaded:
    """Read every setting and where it came from. Only options the user actually
    passed override the environment."""
    model = settings_model(registry)
    environ = os.environ if environ is None else environ
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    env_file = _env_file(environ)
    file_values = read_env_file(env_file, strict=ENV_FILE_VARIABLE in environ) if env_file else {}
    upper_environ = {key.upper(): value for key, value in environ.items()}

    sources: dict[str, Source] = {}
    raw: dict[str, Any] = {}
    warnings: list[LoadWarning] = []
    for name in model.model_fields:
        sources[name], value = _resolve(model, name, given, upper_environ, file_values, warnings)
        if sources[name].kind != "default":
            raw[name] = value
    try:
        settings = model(**raw)
    except ValidationError as exc:
        # include_input=False: the rejected value may be a password-bearing URL.
        error = exc.errors(include_url=False, include_input=False)[0]
        location = str(error["loc"][0]) if error["loc"] else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        if location in sources:
            raise ConfigError(f"invalid setting {_named(model, location, sources[location])}: {message}") from None
        raise ConfigError(f"invalid settings: {message}") from None
    remember_secrets(settings.secrets())
    with contextlib.suppress(ConfigError):
        remember_secrets(settings.database_target().secrets)
    known = {variable for name in model.model_fields for variable in variable_names(model, name)}
    known |= {variable + FILE_SUFFIX for name in FILE_FIELDS for variable in variable_names(model, name)}
    known.add(ENV_FILE_VARIABLE)
    unknown = sorted({key for key in [*upper_environ, *file_values] if key.startswith(ENV_PREFIX)} - known)
    return Loaded(
        settings=settings,
        env_file=env_file,
        sources=sources,
        warnings=warnings,
        unknown=[
            (variable, next(iter(difflib.get_close_matches(variable, sorted(known), n=1, cutoff=0.6)), None))
            for variable in unknown
        ],
    )


def salvage(overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """When the settings do not validate, what can still be read of the few that record
    the failure (textfile, heartbeat, history): raw, from option, environment or
    settings file. Never raises."""
    environ = os.environ if environ is None else environ
    try:
        env_file = _env_file(environ)
        file_values = read_env_file(env_file, strict=False) if env_file else {}
    except ConfigError:
        file_values = {}
    upper_environ = {key.upper(): value for key, value in environ.items()}
    found: dict[str, str | None] = {}
    for name in ("prom_file", "ping_url", "ping_timeout_s", "database_url", "schema_name", "state_dir", "history"):
        try:
            _source, value = _resolve(
                DefaultSettings, name, {k: v for k, v in overrides.items() if v is not None}, upper_environ, file_values
            )
        except (KeyError, ConfigError):
            value = None
        if name in PATH_FIELDS and value is not None and not is_usable_path(str(value)):
            value = None
        found[name] = None if value is None else str(value)
    return found


def _env_file(environ: Mapping[str, str]) -> Path | None:
    named = environ.get(ENV_FILE_VARIABLE)
    if named:
        path = Path(named)
        try:
            exists = path.is_file()
        except OSError as exc:  # a directory this user may not enter
            raise ConfigError(f"cannot read settings file {named}: {exc.strerror}{_as_whom()}") from None
        if not exists:
            raise ConfigError(f"{ENV_FILE_VARIABLE} names {named}, which is not a readable file")
        return path
    default = Path(".env")
    try:
        return default if default.is_file() else None
    except OSError:  # a working directory this user may not look into: no .env there
        return None


# Settings whose value may be given as a file to read instead (the Docker and Kubernetes
# secrets convention: DATABASE_URL_FILE=/run/secrets/database-url), so that the secret
# is in neither the process list nor the environment.
FILE_FIELDS = ("database_url", "ping_url")
FILE_SUFFIX = "_FILE"
MAX_SECRET_FILE_BYTES = 64 * 1024


def read_secret_file(path: str, named: str, warnings: list[LoadWarning] | None = None) -> str:
    """The value in a secret file: its first non-empty line, without the white space
    around it. Nothing of what the file holds is ever put into a message: pointed at the
    wrong file (an env file, /proc/self/environ), it must not show that file's secrets.
    A file others may read adds a warning to `warnings`, once per file."""
    from skybot_cleanup.localfiles import read_named_file

    try:
        data, info = read_named_file(path, MAX_SECRET_FILE_BYTES)
        text = data.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {named} {path}: {exc.strerror or exc}{_as_whom()}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{named} {path} is not UTF-8 text") from None
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not line:
        raise ConfigError(f"{named} {path} is empty")
    if not line.isprintable():  # NUL-separated /proc/self/environ, a binary file
        raise ConfigError(f"{named} {path} holds no URL: its first line has control characters (not shown)")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077 and warnings is not None and all(warning.fields.get("path") != path for warning in warnings):
        # As libpq does for ~/.pgpass: a secret others can read is no longer a secret.
        warnings.append(
            LoadWarning(
                "secret_file_readable",
                {
                    "path": path,
                    "error": f"{named} {path} has mode {mode:04o}: group or others may read it",
                    "hint": f"chmod 600 {path} (or 400; in Kubernetes, defaultMode: 0400)",
                },
            )
        )
    return line


def _resolve(
    model: type[Settings],
    name: str,
    given: Mapping[str, Any],
    environ: Mapping[str, str],
    file_values: Mapping[str, str],
    warnings: list[LoadWarning] | None = None,
) -> tuple[Source, Any]:
    """Where a field's value comes from: option, then environment, then settings file;
    at each, the value itself before a file that holds it."""
    if name in given:
        return Source("option"), given[name]
    file_option = f"{name}_file"
    if name in FILE_FIELDS and given.get(file_option):
        option = "--" + file_option.replace("_", "-")
        return Source("option", option), read_secret_file(str(given[file_option]), option, warnings)
    upper_file = {key.upper(): value for key, value in file_values.items()}
    for origin, values in (("environment", environ), ("settings file", upper_file)):
        for variable in variable_names(model, name):
            if variable in values:
                return Source(origin, variable), values[variable]  # type: ignore[arg-type]
            if name in FILE_FIELDS and values.get(variable + FILE_SUFFIX):
                named = variable + FILE_SUFFIX
                return Source(origin, named), read_secret_file(values[named], named, warnings)  # type: ignore[arg-type]
    return Source("default"), None


def _named(model: type[Settings], name: str, source: Source) -> str:
    if source.kind == "option":
        return source.variable or f"--{name.replace('_', '-')}"
    return source.variable or env_name(name, model)


def describe_settings(loaded: Loaded, problems: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every setting in effect, its variable and its source; secrets redacted (the
    database URL keeps its shape, with the password masked); and what is wrong with a
    setting that validated but cannot work (`problems`, by field)."""
    settings = loaded.settings
    model = type(settings)
    entries = []
    for name in model.model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = _redacted_url(value.get_secret_value()) if name == "database_url" else "***"
        entry = {"variable": env_name(name, model), "value": value, "source": str(loaded.sources[name])}
        if problems and name in problems:
            entry["error"] = problems[name]
        entries.append(entry)
    return {
        "settings_file": str(loaded.env_file) if loaded.env_file else None,
        "settings": entries,
        "unknown": [{"variable": variable, "closest": closest} for variable, closest in loaded.unknown],
    }


def _redacted_url(url: str) -> str:
    from skybot_cleanup.db.urls import parse_database_url

    try:
        return parse_database_url(url).display
    except ConfigError:
        return "*** (not a valid URL)"
