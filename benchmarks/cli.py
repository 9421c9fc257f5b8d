"""The command line: `python -m benchmarks [--admin-url URL] [--results-dir DIR] MODE ...`,
one subcommand per mode module."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchmarks
from benchmarks import aftermath, charts, coexist, layouts, remote, replica, scaling, startup, variants
from benchmarks.measure import RESULTS


@dataclass(frozen=True)
class Mode:
    help: str
    run: Callable[[argparse.Namespace], None]
    configure: Callable[[argparse.ArgumentParser], None] | None = None
    # Seeded data: the sizes (--size, or scaling's --sizes), repetitions and batch size.
    data: bool = False
    size: int = 1_000_000


MODES: dict[str, Mode] = {
    "startup": Mode("the hourly no-op run against the stack's import", startup.run, startup.configure),
    "variants": Mode("batch statement shapes, as raw SQL", variants.run, data=True),
    "scaling": Mode("the floor, single and batched runs at each size", scaling.run, scaling.configure, data=True),
    "aftermath": Mode("what a delete leaves for VACUUM", aftermath.run, aftermath.configure, data=True),
    "layouts": Mode("four heap layouts of the due rows", layouts.run, layouts.configure, data=True),
    "coexist": Mode("the app's own statements beside each method", coexist.run, coexist.configure, data=True),
    "remote": Mode(
        "every command through a delaying proxy: round trips and wall time",
        remote.run,
        remote.configure,
        data=True,
        size=remote.SIZE,
    ),
    "replica": Mode(
        "a streaming standby behind a throttled link: replay lag per method",
        replica.run,
        replica.configure,
        data=True,
        size=replica.SIZE,
    ),
    "chart": Mode("docs/img/scaling.png from results/scaling.json", charts.scaling_chart, charts.configure_scaling),
    "layouts-chart": Mode(
        "docs/img/layouts.png from results/layouts.json", charts.layouts_chart, charts.configure_layouts
    ),
}


def add_data_arguments(parser: argparse.ArgumentParser, size: int, *, sizes: bool) -> None:
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (default 3)")
    parser.add_argument("--live", type=int, default=500_000, help="live tokens beside the due ones")
    parser.add_argument("--revoked", type=int, default=100_000, help="revoked tokens (kept by this task)")
    parser.add_argument("--batch-size", type=int, default=10_000)
    if not sizes:  # scaling has --sizes of its own
        parser.add_argument("--size", type=int, default=size, help=f"due rows (default {size:,})")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=benchmarks.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    top.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where the JSON results go (and the charts read them): smoke runs must not overwrite the real ones",
    )
    sub = top.add_subparsers(dest="mode", required=True)
    for name, mode in MODES.items():
        command = sub.add_parser(name, help=mode.help, description=mode.help)
        if mode.data:
            add_data_arguments(command, mode.size, sizes=name == "scaling")
        if mode.configure is not None:
            mode.configure(command)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    MODES[args.mode].run(args)
