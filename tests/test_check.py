"""`check`: the pre-flight, with the exact statement to run for each problem."""

from __future__ import annotations

import json

import sqlalchemy as sa
from cases import PARTITIONED_REFRESH_TOKEN
from helpers import DAY, HOUR, MINUTE, NOW, check_findings, events, invoke, run_cli, seed_operator_data

from skybot_cleanup.clock import utc_now
from skybot_cleanup.demo import magic_link_row, refresh_token_row


def test_check_says_when_the_role_may_not_use_the_apps_schema(postgres, limited_role):
    role, url = limited_role
    postgres.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    result = invoke("check", "--json", env={"DATABASE_URL": url})
    assert result.exit_code == 1
    findings = [json.loads(line) for line in result.stdout.splitlines()]
    (usage,) = [f for f in findings if "no USAGE" in f["message"]]
    assert usage == {
        "level": "error",
        "message": f'{role} may not use schema "public" (no USAGE), so none of its tables can be seen: '
        "as its owner or a superuser, run",
        "detail": [f'GRANT USAGE ON SCHEMA "public" TO "{role}";'],
    }


def test_check_on_the_apps_schema(postgres):
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 0, result.output
    findings = [json.loads(line) for line in result.stdout.splitlines()]
    levels = {f["message"]: f["level"] for f in findings}
    assert levels['"public"."IdempotencyKey": the 4 columns the tool reads are present with compatible types'] == "ok"
    role = postgres.engine.url.username
    assert levels[f'{role} may SELECT and DELETE on "public"."RefreshToken" (all a cleanup needs; no UPDATE)'] == "ok"
    for name in ("idempotency-keys", "refresh-tokens", "revoked-tokens"):
        assert levels[f"{name}: the planner can use an index for its predicate"] == "ok"
    # The app's MagicLink has no index on expiresAt or used, but it is small: a line of
    # information, and no DDL at all (an index of ours would break Prisma's migrations).
    (magic,) = [f for f in findings if f["message"].startswith("magic-links: its predicate cannot use an index")]
    assert magic["level"] == "info" and magic["detail"] == []
    assert not any("CREATE INDEX" in f["message"] + " ".join(f["detail"]) for f in findings)
    assert ("ok", 'run history: "skybot_cleanup"."runs" is writable (created on the first run)') in [
        (f["level"], f["message"]) for f in findings
    ]
    # The probe rolled back: no history schema was left behind.
    with postgres.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM pg_namespace WHERE nspname = 'skybot_cleanup'")) == 0


def test_check_advises_a_schema_prisma_change_for_a_large_table(postgres):
    now = utc_now()
    postgres.insert("MagicLink", [magic_link_row(f"ml{i}", now + HOUR) for i in range(200)])
    postgres.execute('ANALYZE "MagicLink"')
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_INDEX_ADVICE_ROWS": "100"})
    (magic,) = [json.loads(line) for line in result.stdout.splitlines() if "magic-links: its predicate" in line]
    assert magic["level"] == "warning"
    assert "Add to `model MagicLink` in the app's prisma/schema.prisma" in magic["message"]
    assert magic["detail"][:2] == ["  @@index([expiresAt])", "  @@index([used])"]
    assert 'CREATE INDEX "MagicLink_expiresAt_idx" ON "MagicLink"("expiresAt");' in " ".join(magic["detail"])
    assert "CONCURRENTLY" not in " ".join(magic["detail"])


def test_check_reports_a_renamed_column_and_a_timestamptz_column(postgres):
    postgres.execute('ALTER TABLE "RefreshToken" RENAME COLUMN "revokedAt" TO "revoked_at"')
    postgres.execute('ALTER TABLE "IdempotencyKey" ALTER COLUMN "expiresAt" TYPE timestamptz')
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 1
    findings = check_findings(result)
    assert (
        "error",
        'column "revokedAt" not found in table "public"."RefreshToken" '
        "(setting SKYBOT_CLEANUP_REFRESH_TOKEN_REVOKED_AT_COLUMN)",
    ) in findings
    assert (
        "error",
        '"public"."IdempotencyKey"."expiresAt" is timestamp with time zone, expected timestamp '
        "without time zone (a time-zone-aware column would make every cutoff depend on the session's "
        "zone) (setting SKYBOT_CLEANUP_IDEMPOTENCY_KEY_EXPIRES_AT_COLUMN)",
    ) in findings


def test_check_names_the_connecting_role_in_every_grant(postgres, limited_role):
    role, url = limited_role
    result = invoke("check", "--json", env={"DATABASE_URL": url})
    assert result.exit_code == 1
    findings = [json.loads(line) for line in result.stdout.splitlines()]
    (missing,) = [f for f in findings if f["message"].startswith(f"{role} lacks DELETE on")]
    assert missing["detail"] == [f'GRANT DELETE ON "public"."RefreshToken" TO "{role}";']
    (history,) = [f for f in findings if f["message"].startswith("run history: cannot write")]
    assert history["level"] == "warning"
    assert history["detail"] == [f'CREATE SCHEMA "skybot_cleanup" AUTHORIZATION "{role}";']
    assert not any("current_user" in " ".join([f["message"], *f["detail"]]) for f in findings)


def test_check_warns_about_a_large_backlog(sqlite):
    seed_operator_data(sqlite)
    result = invoke("check", "--json", env={"DATABASE_URL": sqlite.url, "SKYBOT_CLEANUP_BACKLOG_WARNING_ROWS": "1"})
    assert result.exit_code == 0
    (warning,) = [json.loads(line) for line in result.stdout.splitlines() if "refresh-tokens: more than" in line]
    assert warning == {
        "level": "warning",
        "message": "refresh-tokens: more than 1 rows are due; drain them once in batches before scheduling:",
        "detail": ["skybot-cleanup refresh-tokens --batch-size 10000 --max-runtime 1800"],
    }


def test_check_on_a_read_only_database_is_an_error(postgres):
    postgres.execute(f'ALTER DATABASE "{postgres.database}" SET default_transaction_read_only = on')
    result = invoke("check", "--json", env={"DATABASE_URL": postgres.url})
    assert result.exit_code == 1
    assert (
        "error",
        "the database is read-only (default_transaction_read_only is on): every cleanup would fail; "
        "point DATABASE_URL at the primary (with several hosts, add target_session_attrs=read-write)",
    ) in (check_findings(result))
    assert not any("writable" in message for _level, message in check_findings(result))


def test_check_and_metrics_on_a_partitioned_table(postgres):

    postgres.execute(PARTITIONED_REFRESH_TOKEN.format(old=NOW - 60 * DAY, soon=NOW + DAY))
    seed_operator_data(postgres)
    findings = check_findings(invoke("check", "--json", env={"DATABASE_URL": postgres.url}))
    assert (
        "info",
        '"public"."RefreshToken" is partitioned (3 partitions): batches walk every partition, sized from the '
        "partitions' own statistics, and delete row by row; detaching and dropping whole expired partitions is "
        "the app's migrations' job (docs/scaling.md)",
    ) in findings
    snapshot = json.loads(invoke("metrics", "--json", env={"DATABASE_URL": postgres.url}).stdout)
    table = next(t for t in snapshot["tables"] if t["name"] == "RefreshToken")
    assert (table["partitions"], table["rows"]) == (3, 6)
    assert table["size_bytes"] > 0 and table["last_analyze"]
    assert next(t for t in snapshot["tasks"] if t["name"] == "refresh-tokens")["due_rows"] == 2


def test_check_prints_every_grant_for_a_role_with_no_privilege_on_the_tables(postgres, limited_role):
    """Without SELECT nothing can be counted or planned: each check that needs it is
    skipped for that table, and the GRANT is still printed, SELECT included."""
    role, url = limited_role
    postgres.execute(f'REVOKE ALL ON "IdempotencyKey", "RefreshToken", "MagicLink" FROM "{role}"')
    completed = run_cli("check", "--json", env={"DATABASE_URL": url})
    assert completed.returncode == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    findings = [json.loads(line) for line in completed.stdout.splitlines()]
    grants = sorted(detail for f in findings if " lacks " in f["message"] for detail in f["detail"])
    assert grants == sorted(
        f'GRANT SELECT, DELETE ON "public"."{table}" TO "{role}";'
        for table in ("IdempotencyKey", "RefreshToken", "MagicLink")
    )
    not_counted = [f["message"] for f in findings if "not counted" in f["message"]]
    assert not_counted == [
        f'{task}: due rows not counted: {role} may not SELECT from "public"."{table}"'
        for task, table in (
            ("idempotency-keys", "IdempotencyKey"),
            ("refresh-tokens", "RefreshToken"),
            ("magic-links", "MagicLink"),
            ("revoked-tokens", "RefreshToken"),
        )
    ]
    assert not any("not checked" in f["message"] for f in findings)


def test_a_policy_the_role_may_not_run_is_named_and_the_other_checks_still_run(postgres, limited_role):
    """A row-level policy that calls a function the role may not execute (policies that
    call helper functions are common): check names the row-level security as an error,
    does not count what the role cannot see, and runs every check after it; a run of the
    task is refused by the server, exit 2, one line."""
    _role, url = limited_role
    postgres.execute(
        "CREATE FUNCTION public.tenant_ok() RETURNS boolean LANGUAGE sql AS 'SELECT true';"
        "REVOKE EXECUTE ON FUNCTION public.tenant_ok() FROM PUBLIC;"
        'ALTER TABLE "MagicLink" ENABLE ROW LEVEL SECURITY;'
        'CREATE POLICY tenant ON "MagicLink" USING (public.tenant_ok())'
    )
    completed = run_cli("check", "--json", env={"DATABASE_URL": url})
    assert completed.returncode == 1, completed.stderr
    findings = [(f["level"], f["message"]) for f in map(json.loads, completed.stdout.splitlines())]
    assert ("error", 'row-level security is on for "public"."MagicLink"') in [
        (level, message.partition(",")[0]) for level, message in findings
    ]
    (not_counted,) = [message for _, message in findings if message.startswith("magic-links: due rows not counted")]
    assert "row-level security" in not_counted
    assert any(message.startswith("run history:") for _, message in findings)  # the last check ran
    run = run_cli("magic-links", env={"DATABASE_URL": url})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (failed,) = events(run.stderr, "run_failed")
    assert failed["error"].startswith("permission denied for function tenant_ok")


def test_check_measures_what_the_hourly_count_passes_over_and_advises_the_index(postgres):
    """Revoked tokens are kept 90 days for audit: every refresh-tokens run reads them
    through the "expiresAt" index to find the due ones. check says how many, and the
    Prisma index that makes it an index-only scan of due rows; once it exists, says so."""
    now = utc_now()
    postgres.insert(
        "RefreshToken",
        [refresh_token_row(f"audit_{i}", now - HOUR - i * MINUTE, revoked=now - DAY) for i in range(300)]
        + [refresh_token_row("due", now - HOUR), refresh_token_row("live", now + HOUR)],
    )
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_INDEX_ADVICE_ROWS": "100"}
    completed = run_cli("check", "--json", env=env)
    (advice,) = [f for f in map(json.loads, completed.stdout.splitlines()) if "rows it does not delete" in f["message"]]
    # Past the threshold (100 here), counted no further: the planner's estimate.
    assert advice["level"] == "warning" and advice["message"].startswith("refresh-tokens: each run reads ~")
    assert 'rows it does not delete through "RefreshToken_expiresAt_idx"' in advice["message"]
    assert advice["detail"] == [
        "  @@index([expiresAt, revokedAt])",
        'Prisma writes: CREATE INDEX "RefreshToken_expiresAt_revokedAt_idx" '
        'ON "RefreshToken"("expiresAt", "revokedAt");',
    ]
    postgres.execute('CREATE INDEX "RefreshToken_expiresAt_revokedAt_idx" ON "RefreshToken"("expiresAt", "revokedAt")')
    findings = check_findings(run_cli("check", "--json", env=env))
    assert ("ok", "refresh-tokens: an index on (expiresAt, revokedAt) lets each run read only due rows") in findings
    assert not any("rows it does not delete" in message for _level, message in findings)


def test_a_view_in_a_tasks_place_is_an_error_in_check_and_refused_before_a_run_starts(postgres):
    """A view has no physical addresses to delete by: check says so, and every run and dry
    run refuses it at once (it used to pass check and --dry-run, then fail every real run
    with `column "ctid" does not exist`)."""
    postgres.execute('CREATE VIEW public."MagicLinkView" AS SELECT * FROM public."MagicLink"')
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_MAGIC_LINK_TABLE": "MagicLinkView"}
    expected = (
        '"public"."MagicLinkView" is a view, not a table: the tool deletes rows by their physical address, which '
        "only tables have; point the setting at the table itself (setting SKYBOT_CLEANUP_MAGIC_LINK_TABLE)"
    )
    assert ("error", expected) in check_findings(run_cli("check", "--json", env=env))
    for args in (("magic-links",), ("magic-links", "--dry-run")):
        completed = run_cli(*args, env=env)
        assert completed.returncode == 2, completed.stderr
        (failed,) = events(completed.stderr, "run_failed")
        assert failed["error"] == expected
