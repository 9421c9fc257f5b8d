"""skybot-cleanup against its floors, side by side, on identical fresh copies.

    python -m benchmarks startup                  # the hourly no-op run vs the stack's import
    python -m benchmarks variants --size 1000000  # batch statement shapes, as raw SQL
    python -m benchmarks scaling --sizes 10000 100000 1000000 5000000 10000000
    python -m benchmarks aftermath --size 1000000 # what the delete leaves for VACUUM (--shuffled: rows
                                                  # in random order, one due row per page at worst)
    python -m benchmarks layouts --size 1000000   # four heap layouts of the due rows (clustered, mixed
                                                  # lifetimes, scattered ties, one never-analyzed mass tie)
    python -m benchmarks coexist --size 1000000 --seconds 20
                                                  # the app's own statements beside each method, at two rates
    python -m benchmarks remote                   # every command through a proxy adding 0, 10 and 40 ms
                                                  # per round trip: round trips, connections, wall time
    python -m benchmarks replica                  # a streaming standby behind a 100 Mbit/s link (root:
                                                  # a network namespace and tc): replay lag per method
    python -m benchmarks chart                    # docs/img/scaling.png from the saved results
    python -m benchmarks layouts-chart            # docs/img/layouts.png from results/layouts.json

(`python benchmarks/bench.py MODE ...` is the same command.) --results-dir DIR (before the
mode) writes and reads the JSON there instead of benchmarks/results (smoke runs at a small
size, which must not overwrite the real results).

Every measurement is repeated (--reps, default 3) and reported as the median with its
spread (min-max). Data: the app's own "RefreshToken" (and its parent tables, indexes and
foreign keys) from skybot_cleanup.app_schema, seeded into a template database
(benchmarks.seeding), in expiry order as the app writes it or in one of the layouts, with
live and revoked rows beside the due ones. Every method runs on its own copy (CREATE
DATABASE ... TEMPLATE, then CHECKPOINT), with an app writer inserting and refreshing
tokens ~100 times a second, and each mode checks that each method deleted exactly the due
rows and nothing else. Results go to benchmarks/results/<mode>.json and print as Markdown.

`coexist` replaces that writer with the app's real statements, in the shape Prisma sends
them (autocommit, no transactions), from paced threads, and records per statement kind
the latency, the errors by SQLSTATE and the statements that waited for a lock.
"""
