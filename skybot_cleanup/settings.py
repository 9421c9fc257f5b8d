"""The one module that reads configuration: environment, .env file and CLI overrides."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, create_model, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from skybot_cleanup.errors import ConfigError
from skybot_cleanup.tasks import TABLES

ENV_PREFIX = "SKYBOT_CLEANUP_"
# Where the settings file is, for cron and scripts (systemd passes the same file as EnvironmentFile).
ENV_FILE_VARIABLE = f"{ENV_PREFIX}ENV_FILE"
# Quoted identifiers could hold anything, but Prisma names (and their @@map
# renames) never need more than this, and a strict pattern keeps typos obvious.
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$"
DEFAULT_BATCH_SIZE = 10_000


class BaseCleanupSettings(BaseSettings):
    # extra="ignore": the app's own .env holds dozens of variables that are not ours.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", populate_by_name=True
    )

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
        "Default: the URL's schema, else the connection's search_path.",
    )
    revoked_retention_days: int = Field(
        default=90, ge=1, strict=False,
        description="How long revoked refresh tokens are kept for audit before revoked-tokens deletes them.",
    )
    lock_timeout_ms: int = Field(
        default=5000, ge=0,
        description="lock_timeout of each transaction: how long a statement waits for a row or table lock (0: forever).",
    )
    statement_timeout_ms: int = Field(
        default=600_000, ge=0,
        description="statement_timeout of each transaction (0: no limit).",
    )
    connect_timeout_s: int = Field(default=10, ge=1, description="Seconds to wait for a connection.")
    application_name: str = Field(
        default="skybot-cleanup",
        max_length=40,
        description="application_name shown in pg_stat_activity (the task name is appended).",
    )
    batch_size: int | None = Field(
        default=None, ge=1,
        description="Delete in committed batches of at most this many rows (default: one transaction).",
    )
    max_rows: int | None = Field(
        default=None, ge=1,
        description=f"Stop a run after this many rows (implies batches of {DEFAULT_BATCH_SIZE} unless set).",
    )
    max_runtime_s: float | None = Field(
        default=None, gt=0,
        description="Stop a batched run between batches once it has run this long (implies batches).",
    )
    sleep_ms: int = Field(default=0, ge=0, description="Pause between batches, to spare a busy database.")
    max_retries: int = Field(
        default=3, ge=0,
        validation_alias=AliasChoices(f"{ENV_PREFIX}MAX_RETRIES", "JOB_MAX_RETRIES", "max_retries"),
        description="Retries of a transient database error (falls back to the app's JOB_MAX_RETRIES).",
    )
    retry_delay_ms: int = Field(
        default=5000, ge=0,
        validation_alias=AliasChoices(f"{ENV_PREFIX}RETRY_DELAY_MS", "JOB_RETRY_DELAY", "retry_delay_ms"),
        description="First retry delay, doubled each retry (falls back to the app's JOB_RETRY_DELAY).",
    )
    history: bool = Field(
        default=True,
        description="Record every run and metrics snapshot in the tool's own tables (best effort).",
    )
    history_schema: str = Field(
        default="skybot_cleanup", pattern=IDENTIFIER_PATTERN,
        description="Schema of the history tables on PostgreSQL (a table prefix on SQLite), "
        "kept apart from the app's Prisma schema.",
    )
    history_retention_days: int = Field(default=30, ge=1, description="Days of run history to keep.")
    idempotency_stuck_minutes: int = Field(
        default=10, ge=1,
        description="An idempotency key in progress (statusCode NULL) longer than this counts as stuck.",
    )
    backlog_warning_rows: int = Field(
        default=100_000, ge=1,
        description="check warns above this many due rows: run that task with --batch-size first.",
    )
    prom_file: str | None = Field(
        default=None,
        description="node_exporter textfile to write after each run; {task} in the path is replaced, "
        "or give a directory for one file per task.",
    )
    ping_url: SecretStr | None = Field(
        default=None,
        description="Heartbeat URL (healthchecks.io style); {task} is replaced. Pings <url>/start, "
        "then <url>/<exit code>.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="Log format on stderr: auto is JSON unless stderr is a terminal.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged."
    )

    @model_validator(mode="after")
    def _caps_imply_batches(self):
        # A cap can only stop a run between batches.
        if self.batch_size is None and (self.max_rows is not None or self.max_runtime_s is not None):
            self.batch_size = DEFAULT_BATCH_SIZE
        return self


def _identifier_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for table in TABLES.values():
        fields[f"{table.key}_table"] = (
            str,
            Field(default=table.default_name, pattern=IDENTIFIER_PATTERN,
                  description=f'Name of the app\'s "{table.default_name}" table.'),
        )
        for column, (default, _type) in table.columns.items():
            fields[f"{table.key}_{column}_column"] = (
                str,
                Field(default=default, pattern=IDENTIFIER_PATTERN,
                      description=f'Name of "{table.default_name}"."{default}".'),
            )
    return fields


# Table and column names come from the registry, so a new table there is a new setting here.
Settings = create_model("Settings", __base__=BaseCleanupSettings, **_identifier_fields())


def env_name(field_name: str) -> str:
    """The environment variable that sets a field, as messages and the README name it."""
    field = BaseCleanupSettings.model_fields.get(field_name)
    if field is not None and isinstance(field.validation_alias, AliasChoices):
        return str(field.validation_alias.choices[0])
    return f"{ENV_PREFIX}{field_name.upper()}"


def load_settings(**overrides: Any) -> BaseCleanupSettings:
    """Read settings; only options the user actually passed override the environment."""
    given = {name: value for name, value in overrides.items() if value is not None}
    env_file = os.environ.get(ENV_FILE_VARIABLE)
    if env_file and not os.path.isfile(env_file):
        raise ConfigError(f"{ENV_FILE_VARIABLE} names {env_file}, which is not a readable file")
    try:
        return Settings(**given, _env_file=env_file or ".env")
    except ValidationError as exc:
        # include_input=False: the rejected value may be a password-bearing URL.
        error = exc.errors(include_url=False, include_input=False)[0]
        location = str(error["loc"][0]) if error["loc"] else "settings"
        raise ConfigError(f"invalid setting {_variable_named(location)}: {error['msg']}") from None


def _variable_named(location: str) -> str:
    """The variable the user actually set, for a field that several names can set
    (SKYBOT_CLEANUP_MAX_RETRIES or the app's JOB_MAX_RETRIES)."""
    for name, field in Settings.model_fields.items():
        aliases = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else []
        if location == name or location in aliases:
            given = [alias for alias in aliases if isinstance(alias, str) and alias.isupper() and alias in os.environ]
            return given[0] if given else env_name(name)
    return location
