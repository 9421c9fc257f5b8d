"""Adding a task is one `Task` (with its `TableSpec`) and its seed cases: the settings,
the schema, the runner, the deploy files and the generic task tests follow.

Proven here on a registry with a fifth task, built the way tasks.py builds its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from cases import (
    DELETED,
    MS,
    SEED,
    Suite,
    check_deletes_exactly_the_due_rows,
    check_dry_run_counts_and_changes_nothing,
    check_second_run_deletes_nothing,
)
from helpers import NOW, Backend, sqlalchemy_url

from skybot_cleanup.app_schema import app_metadata
from skybot_cleanup.generate.alerts import rules
from skybot_cleanup.generate.deploy import render_files
from skybot_cleanup.registry import METRICS, TASKS, Column, Registry, TableSpec, Task
from skybot_cleanup.settings import env_name, settings_model, table_field

PASSWORD_RESET_TOKEN = TableSpec(
    key="password_reset_token",
    name="PasswordResetToken",
    columns=(
        Column(name="id", type="text", role="id"),
        Column(name="token", type="text"),
        Column(name="expiresAt", type="timestamp", role="expires_at"),
        Column(name="createdAt", type="timestamp", default="CURRENT_TIMESTAMP"),
    ),
    unique=("token",),
    indexes=("expiresAt",),
)
FIFTH = Task(
    name="password-reset-tokens",
    schedule="30 */6 * * *",
    summary="Delete expired password reset tokens.",
    table=PASSWORD_RESET_TOKEN,
    rule='"PasswordResetToken" rows with "expiresAt" < now',
    due=lambda c, cutoff: c["expires_at"] < cutoff,
)
REGISTRY5 = Registry((*TASKS, FIFTH), METRICS)


def reset_token_row(id_: str, expires) -> dict:
    return {"id": id_, "token": f"prt-{id_}", "expiresAt": expires, "createdAt": expires - timedelta(hours=1)}


SUITE5 = Suite(
    registry=REGISTRY5,
    seed={
        **SEED,
        "PasswordResetToken": [
            reset_token_row("prt_expired", NOW - MS),
            reset_token_row("prt_expires_now", NOW),
            reset_token_row("prt_live", NOW + MS),
        ],
    },
    deleted={**DELETED, "password-reset-tokens": {"prt_expired"}},
)


@pytest.fixture(params=["postgres", "sqlite"])
def backend5(request, tmp_path) -> Iterator[Backend]:
    """A database with the five-task registry's tables."""
    metadata = app_metadata(registry=REGISTRY5)
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database")
        engine = sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)
        metadata.tables["PasswordResetToken"].create(engine)  # the template has the others
    else:
        url = f"sqlite:///{tmp_path / 'app5.db'}"
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        metadata.create_all(engine)
    yield Backend(request.param, url, engine, metadata)
    engine.dispose()


@pytest.mark.parametrize("task", REGISTRY5.tasks, ids=lambda task: task.name)
def test_the_generic_task_tests_pass_on_a_fifth_task(backend5, task):
    check_deletes_exactly_the_due_rows(backend5, SUITE5, task)


@pytest.mark.parametrize("task", REGISTRY5.tasks, ids=lambda task: task.name)
def test_batches_on_a_fifth_task(backend5, task):
    check_deletes_exactly_the_due_rows(backend5, SUITE5, task, batch_size=1)


def test_dry_run_and_second_run_on_a_fifth_task(backend5):
    check_dry_run_counts_and_changes_nothing(backend5, SUITE5, FIFTH)
    for table in SUITE5.seed:
        backend5.execute(f'DELETE FROM "{table}"')
    check_second_run_deletes_nothing(backend5, SUITE5)


def test_the_fifth_tasks_settings_schedules_and_alerts_come_from_the_registry():
    model = settings_model(REGISTRY5)
    assert env_name(table_field(PASSWORD_RESET_TOKEN), model) == "SKYBOT_CLEANUP_PASSWORD_RESET_TOKEN_TABLE"
    assert "password_reset_token_expires_at_column" in model.model_fields
    crontab = render_files("crontab", registry=REGISTRY5)["crontab"]
    assert "30 */6 * * * skybot-cleanup set -o pipefail; /usr/local/bin/skybot-cleanup password-reset-tokens" in crontab
    systemd = render_files("systemd", registry=REGISTRY5)
    assert "OnCalendar=*-*-* 00,06,12,18:30:00 UTC" in systemd["systemd/skybot-cleanup-password-reset-tokens.timer"]
    assert "kubernetes/password-reset-tokens.yaml" in render_files("kubernetes", registry=REGISTRY5)
    missing = [
        rule for rule in rules(REGISTRY5)["groups"][0]["rules"] if rule["alert"] == "SkybotCleanupLastSuccessMissing"
    ]
    assert [rule["labels"]["task"] for rule in missing] == [job.name for job in REGISTRY5.jobs]
    assert next(rule for rule in missing if rule["labels"]["task"] == FIFTH.name)["for"] == "12h"
