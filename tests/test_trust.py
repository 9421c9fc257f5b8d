"""No one else's code runs with the tool's rights (issue 24). The tables' owner, the app's
role, plants code that would make it a superuser if a superuser ran it: a trigger on
"RefreshToken", a history schema (and a trigger on its runs table) made before the tool's
first run. Run as a superuser, the tool refuses (exit 2, naming the code and the way out),
the app's role gains nothing, and check says so; a least-privilege role is refused the
same way when the code would write what only it may (the history)."""

from __future__ import annotations

import json
import uuid

import pytest
from helpers import as_role, check_findings, events, least_privilege_grants, run_cli, scalar, seed_due_and_live

ESCALATE = """
CREATE FUNCTION public.escalate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN EXECUTE 'ALTER ROLE "{app}" SUPERUSER'; RETURN OLD; END $$;
ALTER FUNCTION public.escalate() OWNER TO "{app}";
"""


@pytest.fixture
def app_role(postgres, pg_admin):
    """The app's role, owner of its tables (as Prisma's migrations leave them)."""
    app = f"app_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{app}" LOGIN')
    for table in ("IdempotencyKey", "RefreshToken", "MagicLink"):
        postgres.execute(f'ALTER TABLE "{table}" OWNER TO "{app}"')
    postgres.execute(f'GRANT CREATE ON DATABASE "{postgres.database}" TO "{app}"')
    postgres.execute(ESCALATE.format(app=app))
    yield app
    postgres.engine.dispose()
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{postgres.database}" WITH (FORCE)')
        conn.exec_driver_sql(f'DROP ROLE "{app}"')


def is_superuser(backend, role: str) -> bool:
    return bool(scalar(backend, "SELECT rolsuper FROM pg_roles WHERE rolname = :role", role=role))


def test_a_trigger_the_app_planted_never_runs_as_superuser(postgres, app_role):
    due, live = seed_due_and_live(postgres, due=20)
    postgres.execute(
        'CREATE TRIGGER escalate BEFORE DELETE ON public."RefreshToken" FOR EACH ROW EXECUTE FUNCTION public.escalate()'
    )
    env = {"DATABASE_URL": postgres.url}  # the superuser postgres
    completed = run_cli("refresh-tokens", "--json", env=env)
    assert completed.returncode == 2, completed.stderr
    (failed,) = events(completed.stderr, "run_failed")
    assert failed["error"].startswith(
        'deleting from "public"."RefreshToken" would run code another role owns with postgres\'s privileges, which '
        f'that role lacks: trigger "escalate" on "RefreshToken" (function public.escalate(), owned by {app_role}).'
    )
    assert "SKYBOT_CLEANUP_TRUSTED_TRIGGERS" in failed["error"] and "Traceback" not in completed.stderr
    assert not is_superuser(postgres, app_role)
    assert postgres.ids("RefreshToken") == due | live  # refused before a row was deleted
    # check names it as an error, and the superuser as more than a cleanup needs.
    findings = check_findings(run_cli("check", "--json", env=env))
    assert any(
        level == "error" and message.startswith('deleting from "public"."RefreshToken"') for level, message in findings
    )
    (standing,) = [message for level, message in findings if "holds more than a cleanup needs" in message]
    assert standing.startswith("postgres holds more than a cleanup needs: superuser.")
    assert not is_superuser(postgres, app_role)


def test_a_trigger_named_as_trusted_runs(postgres, app_role):
    """The way out for a trigger the operator has read: named, it runs (a harmless one)."""
    _due, live = seed_due_and_live(postgres, due=5)
    postgres.execute(f"""
        CREATE TABLE public.audit (id text);
        ALTER TABLE public.audit OWNER TO "{app_role}";
        CREATE FUNCTION public.audit_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.audit VALUES (OLD.id); RETURN OLD; END $$;
        ALTER FUNCTION public.audit_delete() OWNER TO "{app_role}";
        CREATE TRIGGER audit_delete AFTER DELETE ON public."RefreshToken" FOR EACH ROW
            EXECUTE FUNCTION public.audit_delete();
    """)
    env = {"DATABASE_URL": postgres.url, "SKYBOT_CLEANUP_TRUSTED_TRIGGERS": "audit_delete"}
    completed = run_cli("refresh-tokens", "--json", env=env)
    assert completed.returncode == 0, completed.stderr
    assert postgres.ids("RefreshToken") == live
    assert scalar(postgres, "SELECT count(*) FROM public.audit") == 5


def test_a_history_schema_another_role_planted_is_never_written_or_read(postgres, app_role):
    """The database's owner makes the tool's schema before its first run, with a runs
    table whose trigger escalates: no command writes or reads it, each says why."""
    due, live = seed_due_and_live(postgres, due=5)
    postgres.execute(f"""
        SET ROLE "{app_role}";
        CREATE SCHEMA skybot_cleanup;
        CREATE TABLE skybot_cleanup.runs (id bigserial PRIMARY KEY, run_id text, task text, status text,
            dry_run boolean, rows bigint, cutoff timestamp, finished_at timestamp, duration_ms integer,
            exit_code smallint, host text, error_class text, error text);
        CREATE TRIGGER escalate BEFORE INSERT ON skybot_cleanup.runs FOR EACH ROW EXECUTE FUNCTION public.escalate();
        RESET ROLE;
    """)
    env = {"DATABASE_URL": postgres.url}
    run = run_cli("refresh-tokens", "--json", env=env)
    assert run.returncode == 2, run.stderr
    (failed,) = events(run.stderr, "run_failed")
    owned_by = f'the run history\'s schema "skybot_cleanup" is owned by {app_role}, not by postgres'
    assert failed["error"].startswith(owned_by)
    assert postgres.ids("RefreshToken") == due | live
    metrics = run_cli("metrics", "--json", env=env)
    assert metrics.returncode == 2, metrics.stderr
    status = run_cli("status", "--json", env=env)
    assert status.returncode == 1
    jobs = {job["task"]: job for job in map(json.loads, status.stdout.splitlines())}
    # The two that ran failed (their records wait in the spool); the others cannot be judged.
    assert {name: job["health"] for name, job in jobs.items()} == {
        name: "FAILING" if name in ("refresh-tokens", "metrics") else "UNKNOWN" for name in jobs
    }
    for job in jobs.values():
        assert owned_by in (job["error"] if job["health"] == "UNKNOWN" else job["last_failure_error"])
    findings = check_findings(run_cli("check", "--json", env=env))
    assert any(level == "error" and message.startswith(f"run history: {owned_by}") for level, message in findings)
    assert scalar(postgres, "SELECT count(*) FROM skybot_cleanup.runs") == 0  # nothing was ever written there
    assert not is_superuser(postgres, app_role)
    # Named by the operator, the schema's owner is trusted; its table's trigger still is not.
    named = run_cli("refresh-tokens", "--json", env={**env, "SKYBOT_CLEANUP_HISTORY_OWNER": app_role})
    assert named.returncode == 2
    (failed,) = events(named.stderr, "run_failed")
    assert failed["error"].startswith(
        'the run history "skybot_cleanup"."runs" has code another role owns, which writing it would run with '
        f'postgres\'s privileges: trigger "escalate" on "runs" (function public.escalate(), owned by {app_role})'
    )
    assert not is_superuser(postgres, app_role)


def test_a_least_privilege_role_is_refused_code_that_would_forge_its_history(postgres, app_role, pg_admin):
    """The cleanup role may write its history; the app's may not. A trigger of the app's
    that wrote there as the cleanup role would forge what `status` trusts."""
    due, live = seed_due_and_live(postgres, due=5)
    cleanup = f"cleanup_{uuid.uuid4().hex[:8]}"
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{cleanup}" LOGIN')
    try:
        for statement in least_privilege_grants(cleanup):
            postgres.execute(statement)
        url = as_role(postgres.url, cleanup)
        clean = run_cli("idempotency-keys", "--json", env={"DATABASE_URL": url})  # makes its history
        assert clean.returncode == 0, clean.stderr
        postgres.execute(f"""
            CREATE FUNCTION public.forge() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO skybot_cleanup.runs (run_id, task, status, dry_run, rows, cutoff, finished_at,
                  duration_ms, exit_code, host) VALUES ('forged', 'refresh-tokens', 'ok', false, 999999,
                  pg_catalog.now(), pg_catalog.now(), 1, 0, 'x'); RETURN OLD; END $$;
            ALTER FUNCTION public.forge() OWNER TO "{app_role}";
            CREATE TRIGGER forge BEFORE DELETE ON public."RefreshToken" FOR EACH ROW EXECUTE FUNCTION public.forge();
        """)
        completed = run_cli("refresh-tokens", "--json", env={"DATABASE_URL": url})
        assert completed.returncode == 2, completed.stderr
        assert postgres.ids("RefreshToken") == due | live
        assert scalar(postgres, "SELECT count(*) FROM skybot_cleanup.runs WHERE run_id = 'forged'") == 0
        # The least-privilege role holds nothing beyond need, and keeps working where no such code is.
        findings = check_findings(run_cli("check", "--json", env={"DATABASE_URL": url}))
        assert ("ok", f"{cleanup} holds nothing beyond what a cleanup needs") in findings
        postgres.execute('DROP TRIGGER forge ON public."RefreshToken"')
        assert run_cli("refresh-tokens", env={"DATABASE_URL": url}).returncode == 0
        assert postgres.ids("RefreshToken") == live
    finally:
        postgres.execute(f'DROP OWNED BY "{cleanup}"')
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f'DROP ROLE "{cleanup}"')
