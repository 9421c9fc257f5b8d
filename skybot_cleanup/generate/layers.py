"""The package's layers, lowest first, and what each module holds.

A module may import only modules of a lower layer, so the modules of one layer never
import each other (run, metrics, status and check stay apart). tests/test_architecture.py
enforces this list on every import; docs/architecture.md's layer table is generated from
it (generate/docs.py). A new module gets its line here, in the lowest layer above
everything it imports.
"""

from __future__ import annotations

LAYERS: list[dict[str, str]] = [
    {  # no import of the package
        "vocabulary": "The closed vocabularies, one enum each: run statuses, health words, finding levels, stop "
        "reasons.",
    },
    {
        "clock": "Time in the one form the tool uses: naive UTC at millisecond precision, like the app's "
        "Prisma columns.",
        "errors": "Exit codes (`ExitCode`), the exceptions, and `classify`: the one place where failures become "
        "statuses, exit codes, retry decisions and one-line messages.",
        "schedule": "What the registry's cron schedules mean in time (intervals, next runs), and how each "
        "scheduler spells them.",
        "localfiles": "Local files other users may be able to touch (the spool, textfiles, generated units), "
        "opened and written safely.",
    },
    {
        "registry": "The registry: which tables the app has, what each job deletes or measures, and when it runs.",
        "signals": "Stop signals: Interrupted while a run works, only noted once its work is over, so its "
        "record is written whole and the process exits with the code the record holds.",
        "logs": "structlog on stderr: JSON for machines, key=value for people at a terminal, each line with its "
        "syslog priority for journald and `logger --prio-prefix`.",
    },
    {"spool": "The local spool: run records the database could not take, one JSON file each in the state directory."},
    {
        "results": "`RunResult`, the one type every recorded run ends with, and `build_result`, the one way to "
        "build it.",
        "db.urls": "`DATABASE_URL` as Render, Prisma and libpq write it, made into what psycopg accepts.",
    },
    {
        "db.connection": "Engines, and `RunConnection`: a run's chain of transactions with its session settings "
        "and lock.",
    },
    {
        "db.catalog": "The app's tables as the database has them (their shape, leaves, privileges, row-level "
        "security), bound as SQLAlchemy Core objects (`bind_table`).",
        "db.reads": "Several reads in one round trip (psycopg's pipeline mode), each failing alone.",
    },
    {
        "db.counts": "Counting rows cheaply: exact up to a cap, the planner's estimate past it, in one round trip "
        "with the rest of a report.",
        "db.batches": "The statements that delete a slice of a task's due rows, and only due rows.",
    },
    {  # the db package's face
        "db": "The `db` package's face: re-exports only, so `from skybot_cleanup import db` reads well.",
    },
    {
        "settings": "The one module that reads configuration: options, the environment, the settings file, the "
        "app's variables.",
    },
    {
        "cutoff": 'A run\'s one "now", and the cutoff each task deletes below.',
        "retry": "Retrying transient database errors (tenacity), for every command that talks to the database.",
        "heartbeat": "Heartbeat pings in the healthchecks.io convention: `<url>/start`, then `<url>/<exit code>`.",
        "app_schema": "The app's tables as its Prisma migrations create them: the test, demo and benchmark schema.",
        "walks": "The walks a batched run takes through the due rows (index, heap, rowid), one class each, owning "
        "its cursor.",
        "trust": "What the tool trusts before it writes (no other role's code run with its privileges, a "
        "history of its own) and what its role holds beyond a cleanup's needs.",
        "pacing": "Replica-aware pacing: waiting between batches so that every streaming standby stays within the "
        "lag target.",
    },
    {
        "history": "Run history and metric snapshots in the tool's own tables, with the spool for the runs the "
        "database could not take.",
    },
    {
        "recording": "`RecordedRun`: the shell every recorded run shares (its id, pings, failure, result, history "
        "row and last log line).",
        "health": "The one judgement of every job: its health by its runs, and its backlog, measured or not "
        "measurable; status, metrics and check render it.",
    },
    {  # one job or one report each
        "run": "A cleanup run (`run_task`, `Run`): one task, one cutoff, one connection at a time, batch by batch.",
        "metrics": "`skybot-cleanup metrics`: one cheap snapshot of backlogs, sessions and table health.",
        "status": "`skybot-cleanup status`: is every job running, succeeding and keeping up?",
        "check": "`skybot-cleanup check`: the pre-flight, one small function per check.",
    },
    {
        "textfiles": "Prometheus series in node_exporter textfiles (and the Pushgateway): every series the tool "
        "exports.",
        "demo": "`skybot-cleanup demo`: the app's tables, seeded, then cleaned, in SQLite or an empty PostgreSQL "
        "database.",
    },
    {  # for `skybot-cleanup schedule` and the maintainers; never part of a run
        "generate": "Files generated from the registry and the code; nothing that runs a job imports this package.",
    },
    {
        "generate.layers": "This table: the package's layers, which `tests/test_architecture.py` enforces.",
        "generate.alerts": "The monitoring pack (`deploy/monitoring/`): alert rules, their promtool tests, a "
        "Grafana dashboard.",
        "generate.lock": "`requirements.lock`: the exact versions the container image installs.",
    },
    {
        "generate.deploy": "Deployment files for cron, systemd, Render and Kubernetes (with the Dockerfile), "
        "rendered from the registry.",
    },
    {
        "generate.docs": "The generated sections of the README and the docs/ pages: commands, exit codes, "
        "settings, install steps, timers, alerts and this table.",
    },
    {"commands": "What each command does, as plain functions of the settings (usable from Python as they are)."},
    {"views": "Every rendering of the tool's output, text for people and JSON for scripts."},
    {"cli": "The command line: parse, call `commands`, render with `views`, exit."},
    {"__main__": "`python -m skybot_cleanup`: `cli.main()`."},
]
