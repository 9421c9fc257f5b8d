#!/usr/bin/env python3
"""`python benchmarks/bench.py MODE ...`: the same as `python -m benchmarks MODE ...`, the
command docs/benchmarks.md has always quoted."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this file's directory heads the path: the repository's replaces it,
    # so that the package's modules (app, cli, ...) never shadow a top-level module.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    from benchmarks.cli import main

    main()
