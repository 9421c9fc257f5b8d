"""`python -m benchmarks`: cli.main()."""

from benchmarks.cli import main

main()
