"""Draw one run's rows from the results CSV: a bar per contender per case, a panel per mode.

    python benchmarks/plot.py --list                          # the runs the CSV holds
    python benchmarks/plot.py --benchmark layer               # the latest layer run: speedup over its baseline
    python benchmarks/plot.py --benchmark layer --device EPYC --commit 0760dc1 --metric saved --y value
    python benchmarks/plot.py --run 20261206T174558Z-19103 --where mode=backward --out chart.png

Filters pick rows (``--device``: part of the device's name, ``--commit``: a prefix); of the runs left, the latest
is drawn, so that a chart never sets numbers from different processes side by side. ``--y speedup`` (the default)
draws baseline / value from each row's ratio, ``ratio`` value / baseline, ``value`` the value itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter
from runner import CSV, read


def runs(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each run, in the CSV's order."""
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    return by_run


def select(rows: list[dict], benchmark: str | None = None, device: str | None = None, commit: str | None = None,
           run: str | None = None, metric: str = "time", where: dict[str, str] | None = None) -> list[dict]:
    """The rows of ``metric`` (and params matching ``where``) of the latest run that matches the filters."""
    matching = [r for r in rows if (benchmark is None or r["benchmark"] == benchmark)
                and (device is None or device.lower() in r["device"].lower())
                and (commit is None or r["commit"].startswith(commit)) and (run is None or r["run"] == run)]
    if not matching:
        return []
    latest = max(runs(matching).values(), key=lambda rs: (rs[0]["date"], rs[0]["run"]))
    return [r for r in latest if r["metric"] == metric
            and all(str(r["params"].get(key)) == value for key, value in (where or {}).items())]


def _y(row: dict, y: str) -> float | None:
    if y == "value":
        return row["value"]
    if row["ratio"] is None or row["contender"] == row["baseline"]:
        return None
    return row["ratio"] if y == "ratio" else 1 / row["ratio"]


def plot(rows: list[dict], path: Path, y: str = "speedup") -> Path | None:
    """Grouped bars of ``rows`` (one run, one metric): a group per case, a bar per contender, a panel per mode."""
    points = [(r, _y(r, y)) for r in rows]
    points = [(r, v) for r, v in points if v is not None]
    if not points:
        return None
    modes = list(dict.fromkeys(r["params"].get("mode") for r, _ in points))
    names = list(dict.fromkeys(r["contender"] for r, _ in points))
    palette = plt.cm.tab10 if len(names) <= 10 else plt.cm.tab20
    colors = {name: palette(i % palette.N) for i, name in enumerate(names)}
    first = points[0][0]
    fig, axes = plt.subplots(len(modes), 1, figsize=(13, 4.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        of_mode = [(r, v) for r, v in points if r["params"].get("mode") == mode]
        cases = list(dict.fromkeys(r["case"] for r, _ in of_mode))
        here = [n for n in names if any(r["contender"] == n for r, _ in of_mode)]
        width = 0.8 / len(here)
        for k, name in enumerate(here):
            value = {r["case"]: v for r, v in of_mode if r["contender"] == name}
            xs = [i + (k - (len(here) - 1) / 2) * width for i, c in enumerate(cases) if c in value]
            ax.bar(xs, [value[c] for c in cases if c in value], width, label=name, color=colors[name])
        values = [v for _, v in of_mode]
        wide = min(values) > 0 and max(values) / min(values) > 8  # a log axis only where a linear one squashes
        if wide:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        if y != "value":
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(top=max(values) * (2.0 if wide else 1.3))  # headroom for the legend
        ax.set_xticks(range(len(cases)), [c.replace(" ", "\n", 3) for c in cases], fontsize=7)
        baseline = first["baseline"] or "baseline"
        label = {"speedup": f"{baseline} / contender", "ratio": f"contender / {baseline}",
                 "value": first["unit"]}[y]
        ax.set_ylabel(f"{first['metric']}: {label}" + (" (log)" if wide else ""))
        ax.set_title(mode or "")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=min(len(here), 4))
    fig.suptitle(f"{first['benchmark']} {first['metric']} — {first['device']} — commit {first['commit'][:12]} — "
                 f"{first['date']}\n{first['command']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=CSV, help="the results CSV (default benchmarks/results/all.csv)")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    parser.add_argument("--benchmark")
    parser.add_argument("--device", help="part of the device's name")
    parser.add_argument("--commit", help="a prefix of the commit")
    parser.add_argument("--run", help="a run id (see --list)")
    parser.add_argument("--metric", default="time")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="a case parameter")
    parser.add_argument("--y", choices=("speedup", "ratio", "value"), default="speedup")
    parser.add_argument("--out", type=Path, help="the PNG (default beside the CSV, named after the run)")
    args = parser.parse_args(argv)
    rows = read(args.csv)
    if args.list:
        for run_id, of_run in runs(rows).items():
            r = of_run[0]
            print(f"{run_id}  {r['benchmark']:12s}  {r['device']}  {r['commit'][:12]}  {len(of_run)} rows  "
                  f"{r['command']}")
        return None
    where = dict(item.split("=", 1) for item in args.where)
    chosen = select(rows, args.benchmark, args.device, args.commit, args.run, args.metric, where)
    if not chosen:
        sys.exit("no rows match")
    first = chosen[0]
    out = args.out or args.csv.parent / f"{first['benchmark']}_{args.metric.replace(' ', '-')}_{first['run']}.png"
    path = plot(chosen, out, args.y)
    print(path or f"nothing to draw as {args.y} (no ratios? try --y value)")
    return path


if __name__ == "__main__":
    main()
