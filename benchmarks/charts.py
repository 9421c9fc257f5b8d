"""`chart` and `layouts-chart`: the docs' figures from saved results (matplotlib: the bench extra)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.measure import HERE, load, median_spread

SCALING_CHART = HERE.parent / "docs" / "img" / "scaling.png"
LAYOUTS_CHART = HERE.parent / "docs" / "img" / "layouts.png"


def configure_scaling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=SCALING_CHART)


def configure_layouts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=LAYOUTS_CHART)


def scaling_chart(args: argparse.Namespace) -> None:
    """docs/img/scaling.png from results/scaling.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load(args.results_dir, "scaling")
    runs = [r for r in results if r["method"] != "reporting"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    sizes = sorted({r["due"] for r in runs})
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels: list[tuple[Any, str, Callable[[dict[str, Any]], float], str]] = [
        (axes[0][0], "seconds (statement; the tool's run without start-up)", lambda r: r["statement_s"], "log"),
        (axes[0][1], "WAL written, MB", lambda r: r["wal_bytes"] / 1e6, "log"),
        (axes[1][0], "rows per second", lambda r: r["due"] / r["statement_s"], "linear"),
    ]
    for axis, title, value, scale in panels:
        for method in methods:
            medians, lows, highs = [], [], []
            for size in sizes:
                median, low, high = median_spread(
                    [value(r) for r in runs if r["method"] == method and r["due"] == size]
                )
                medians.append(median)
                lows.append(median - low)
                highs.append(high - median)
            axis.errorbar(sizes, medians, yerr=[lows, highs], marker="o", capsize=3, label=method)
        axis.set_xscale("log")
        axis.set_yscale(scale)
        axis.set_xlabel("due rows")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    axis = axes[1][1]
    reporting = [r for r in results if r["method"] == "reporting"]
    for key, label in (("metrics_ms", "metrics snapshot"), ("status_ms", "status")):
        xs = [r["due"] for r in reporting]
        axis.plot(xs, [statistics.median(r[key]) for r in reporting], marker="o", label=label)
    axis.axhline(100, color="grey", linestyle="--", label="target: 100 ms")
    axis.set_xscale("log")
    axis.set_xlabel("due rows")
    axis.set_title("SQL time of metrics and status, ms")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.suptitle("skybot-cleanup refresh-tokens: median of the repetitions, bars from min to max")
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


# The targets the chart marks: a method's median over the floor's, time and WAL.
LAYOUT_TARGETS = {"single transaction": (1.1, 1.1), "batched": (1.3, 1.1)}


def layouts_chart(args: argparse.Namespace) -> None:
    """docs/img/layouts.png from results/layouts.json: per layout, time and WAL over the
    floor for the single transaction and the batches, dashed at each target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = load(args.results_dir, "layouts")
    layouts = list(dict.fromkeys(r["layout"] for r in results))
    figure, axes = plt.subplots(1, len(layouts), figsize=(3.6 * len(layouts), 4.6), squeeze=False)
    width = 0.38
    for axis, layout in zip(axes[0], layouts, strict=True):
        runs = [r for r in results if r["layout"] == layout]
        floors = [r for r in runs if r["method"] == "floor"]
        base = {
            "time": statistics.median(r["statement_s"] for r in floors),
            "WAL": statistics.median(r["wal_bytes"] for r in floors),
        }
        methods = [m for m in dict.fromkeys(r["method"] for r in runs) if m != "floor"]
        for i, method in enumerate(methods):
            target = LAYOUT_TARGETS["batched" if method.startswith("batched") else method]
            for j, (measure, key) in enumerate((("time", "statement_s"), ("WAL", "wal_bytes"))):
                median, low, high = median_spread([r[key] / base[measure] for r in runs if r["method"] == method])
                x = j + (i - (len(methods) - 1) / 2) * width
                axis.bar(
                    x, median, width * 0.9, yerr=[[median - low], [high - median]], capsize=3,
                    color=f"C{i}", label=method if j == 0 else None,
                )  # fmt: skip
                axis.hlines(target[j], x - width / 2, x + width / 2, colors="black", linestyles="dashed")
        axis.axhline(1, color="grey", linewidth=0.8)
        axis.set_xticks([0, 1], ["time × floor", "WAL × floor"])
        axis.set_title(f"{layout} ({runs[0]['task']})")
        axis.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("median over the floor's (bars: min–max)")
    axes[0][0].plot([], [], color="black", linestyle="dashed", label="target")
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3)  # below: off the bars
    due = results[0]["due"]
    figure.suptitle(f"skybot-cleanup on four heap layouts, {due:,} due rows: time and WAL over the plain DELETE")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
