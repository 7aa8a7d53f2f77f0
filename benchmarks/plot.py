"""Draw the speedup-vs-unfused chart from a results JSON written by run.py.

Usage: ``python benchmarks/plot.py benchmarks/results/<name>.json`` writes ``<name>.png`` beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

_MODE_TITLES = {"forward": "forward (no grad)", "backward": "forward + backward (dx, dA, dB)"}


def _case_label(case: dict) -> str:
    return f"{case['in_features']}→{case['out_features']}\nM={case['tokens']} r={case['rank']} p={case['dropout']}"


def plot_speedup(rows: list[dict], path: Path, title: str) -> Path | None:
    """Grouped bars of each contender's speedup over ``unfused``, one panel per mode; None if no data."""
    rows = [r for r in rows if r["status"] == "ok" and r["contender"] != "unfused"]
    modes = [m for m in _MODE_TITLES if any(r["case"]["mode"] == m for r in rows)]
    if not modes:
        return None
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(contenders)}
    fig, axes = plt.subplots(len(modes), 1, figsize=(13, 4.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        mode_rows = [r for r in rows if r["case"]["mode"] == mode]
        cases = list(dict.fromkeys(_case_label(r["case"]) for r in mode_rows))
        names = [n for n in contenders if any(r["contender"] == n for r in mode_rows)]
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            speed = {_case_label(r["case"]): r["speedup_vs_unfused"] for r in mode_rows if r["contender"] == name}
            xs = [i + (k - (len(names) - 1) / 2) * width for i, c in enumerate(cases) if c in speed]
            ax.bar(xs, [speed[c] for c in cases if c in speed], width, label=name, color=colors[name])
        ax.axhline(1.0, color="black", linewidth=0.8)
        values = [r["speedup_vs_unfused"] for r in mode_rows]
        wide = max(values) / min(values) > 8  # a log axis only where a linear one would squash the bars
        if wide:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "25" else ""))
        ax.set_ylim(top=max(values) * (2.0 if wide else 1.3))  # headroom for the legend
        ax.set_xticks(range(len(cases)), cases, fontsize=8)
        ax.set_ylabel("speedup vs unfused (x" + (", log)" if wide else ")"))
        ax.set_title(_MODE_TITLES[mode])
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=min(len(names), 4))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> None:
    for name in argv:
        report = json.loads(Path(name).read_text())
        path = plot_speedup(report["layer"], Path(name).with_suffix(".png"), report["meta"]["title"])
        print(path or f"{name}: no layer results to plot")


if __name__ == "__main__":
    main(sys.argv[1:])
