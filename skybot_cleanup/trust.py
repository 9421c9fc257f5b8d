"""What the tool trusts before it writes, and what it holds beyond a cleanup's needs: one
definition each, which every run, `check`, `status` and `metrics` apply.

PostgreSQL runs a table's triggers, its rules' function calls and its row-level policies
with the privileges of whoever fires them. A run that deletes (or records its history)
would therefore run the code of the tables' owners with the tool's own privileges, which
may be more than theirs: a superuser in DATABASE_URL, or even a least-privilege role,
which may write the history the app's role may not. So:

- a run refuses (exit 2) to delete from a table when a trigger or rule on it (or on a
  leaf) would run another role's code with privileges that role lacks, unless the
  operator names it in SKYBOT_CLEANUP_TRUSTED_TRIGGERS;
- the history is written and read only in a schema and tables of the tool's role's own
  (or of the role SKYBOT_CLEANUP_HISTORY_OWNER names), with no such code on them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from skybot_cleanup import db
from skybot_cleanup.registry import Task

TRUSTED_SETTING = "SKYBOT_CLEANUP_TRUSTED_TRIGGERS"
HISTORY_OWNER_SETTING = "SKYBOT_CLEANUP_HISTORY_OWNER"


def privilege_problem(task: Task, table: db.BoundTable, *, deleting: bool = True) -> str | None:
    """What keeps a run of `task` (a dry run: `deleting` False) from working on `table`,
    whether or not anything is due."""
    info = table.info
    needed = (("SELECT", info.can_select), ("DELETE", info.can_delete or not deleting))
    missing = [name for name, granted in needed if not granted]
    if not missing:
        return None
    return (
        f"{info.role} lacks {' and '.join(missing)} on {table.shown}: every {task.name} run fails until it is "
        "granted (`skybot-cleanup check` prints the GRANT)"
    )


def code_problem(table: db.BoundTable, trusted: Collection[str]) -> str | None:
    """Why a run may not delete from `table`: someone else's code would run as the tool."""
    unsafe = table.info.unsafe_code(db.DELETE, trusted)
    if not unsafe:
        return None
    return (
        f"deleting from {table.shown} would run code another role owns with {table.info.role}'s privileges, which "
        f"that role lacks: {'; '.join(map(str, unsafe))}. Run the tool as a least-privilege role (`skybot-cleanup "
        f"check` prints one), or, once you have read that code, name it in {TRUSTED_SETTING}"
    )


def history_problem(
    found: Sequence[db.TableInfo | BaseException | None], history_owner: str | None, trusted: Collection[str]
) -> str | None:
    """Why the history's tables (db.lookup_tables' answers for history.wanted) may not be
    written or read by this role, or None. Tables not made yet are fine: the tool makes
    them in a schema it checks then (history.ensure_tables)."""
    for info in found:
        if isinstance(info, BaseException):
            return f"the run history cannot be used: {info}"
        if info is None:
            continue
        owners = {info.role, *([history_owner] if history_owner else [])}
        shown = db.qualified(info.schema, info.name)
        if info.schema_owner not in owners:
            return history_owner_problem(f'schema "{info.schema}"', info.schema_owner, info.role)
        if info.owner not in owners:
            return history_owner_problem(shown, info.owner, info.role)
        unsafe = info.unsafe_code(db.INSERT | db.DELETE, trusted)
        if unsafe:
            return (
                f"the run history {shown} has code another role owns, which writing it would run with "
                f"{info.role}'s privileges: {'; '.join(map(str, unsafe))}"
            )
    return None


def history_owner_problem(what: str, owner: str, role: str) -> str:
    return (
        f"the run history's {what} is owned by {owner}, not by {role}: the tool writes and reads its history only "
        f"where no other role's code can run as it. Drop it and let the tool make its own (or, as a superuser, "
        f'ALTER ... OWNER TO "{role}"), or name {owner} in {HISTORY_OWNER_SETTING} if you trust it'
    )


def beyond_need(info: db.TableInfo, table: str) -> list[str]:
    """What the role holds beyond a cleanup's needs (SELECT and DELETE on the task tables,
    its own history schema), in words: the role's own attributes, then this table's."""
    if info.superuser:  # every privilege there is: naming the others would add nothing
        return ["superuser"]
    found = ["CREATEROLE"] if info.createrole else []
    found += [f"member of {role}" for role in info.server_roles]
    if info.owned:
        found.append(f"owner of {table}" if info.owner == info.role else f"member of {table}'s owner {info.owner}")
    if info.extra_privileges:
        found.append(f"{', '.join(info.extra_privileges)} on {table}")
    return found
