"""Compare training runs of the same model and data (LoRA setups, full fine-tuning): a Markdown table and a PNG chart.

    python examples/e2e/compare.py runs/lora-qv runs/lora-all runs/full --out runs/compare

The last run is the baseline every other run's costs and scores are divided by (put full fine-tuning
last). Reads each run's ``run.json`` (written by train.py: trainable parameters, checkpoint bytes, peak
training memory, median step time, tokens/s, all measured in that run) and, when present, its E2E scores
``RUN/test/scores.json`` (``evaluate.py REFS OUTPUTS --json``). Nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
# (label, run.json key, formatter)
COSTS = (
    ("trainable parameters", "trainable_params", lambda v: f"{v:,}"),
    ("checkpoint bytes on disk", "checkpoint_bytes", lambda v: f"{v:,}"),
    ("peak training memory beyond the weights (MiB)", "peak_memory_bytes", lambda v: f"{v / 2**20:,.1f}"),
    ("median step time (ms)", "median_step_s", lambda v: f"{v * 1e3:,.1f}"),
    ("tokens/s", "tokens_per_s", lambda v: f"{v:,.0f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders; the last is the baseline (e.g. full fine-tuning)")
    p.add_argument("--out", help="folder for compare.md, compare.png and compare.json (default: print only)")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs")
    return args


def load_run(run: str) -> dict:
    """The run's ``run.json`` with its scores (None when not evaluated) and a label."""
    info = common.read_json(Path(run) / "run.json")
    path = Path(run) / "test" / "scores.json"
    info["scores"] = common.read_json(path) if path.is_file() else None
    info.setdefault("setup", info["method"])
    info.setdefault("recipe", "paper")
    return info


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}x" if b else "n/a"


def shared_metrics(runs: list[dict]) -> list[str]:
    return [m for m in METRICS if all(r["scores"] and m in r["scores"] for r in runs)]


def table(runs: list[dict]) -> str:
    """The Markdown comparison: each run's value and, for all but the baseline, its ratio to the baseline."""
    baseline = runs[-1]
    if len({r["base"] for r in runs}) > 1:
        print(f"warning: the runs used different base models ({', '.join(r['base'] for r in runs)})", file=sys.stderr)
    others = runs[:-1]
    lines = [f"{', '.join(r['setup'] for r in others)} vs {baseline['setup']} on {baseline['model']} "
             f"({baseline['recipe']} recipe, {baseline['device']}, {baseline['world_size']} process(es); "
             f"memory: {baseline['memory_kind']})", "",
             "| measure | " + " | ".join(r["setup"] for r in runs) + " | " +
             " | ".join(f"{r['setup']} / {baseline['setup']}" for r in others) + " |",
             "| --- |" + " ---: |" * (2 * len(runs) - 1)]
    for label, key, fmt in COSTS:
        lines.append(f"| {label} | " + " | ".join(fmt(r[key]) for r in runs) + " | " +
                     " | ".join(ratio(r[key], baseline[key]) for r in others) + " |")
    for metric in shared_metrics(runs):
        lines.append(f"| E2E {metric} | " + " | ".join(f"{r['scores'][metric]:.4f}" for r in runs) + " | " +
                     " | ".join(ratio(r["scores"][metric], baseline["scores"][metric]) for r in others) + " |")
    return "\n".join(lines) + "\n"


def chart(path: Path, runs: list[dict]) -> None:
    """Left: each run's cost relative to the baseline (log scale); right: every run's E2E scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline, others = runs[-1], runs[:-1]
    metrics = shared_metrics(runs)
    fig, axes = plt.subplots(1, 2 if metrics else 1, figsize=(13 if metrics else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    height = 0.8 / len(others)
    for i, run in enumerate(others):
        ratios = [run[key] / baseline[key] if baseline[key] else float("nan") for _, key, _ in COSTS]
        ys = [y + (i - (len(others) - 1) / 2) * height for y in range(len(COSTS))]
        ax.barh(ys, ratios, height=height, label=run["setup"])
        for y, value in zip(ys, ratios, strict=True):
            ax.annotate(f"{value:.3g}x", (value, y), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize=8)
    ax.set_yticks(range(len(COSTS)), [label for label, _, _ in COSTS])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"relative to {baseline['setup']} (log scale; 1 = equal)")
    ax.set_title(f"Training cost, {baseline['model']}")
    ax.legend(fontsize=8)
    if metrics:
        ax = axes[0][1]
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            xs = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(metrics))]
            ax.bar(xs, [run["scores"][m] for m in metrics], width=width, label=run["setup"])
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_title("E2E test scores")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    runs = [load_run(run) for run in args.runs]
    text = table(runs)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        common.write_atomic(out / "compare.md", text)
        chart(out / "compare.png", runs)
        common.write_atomic(out / "compare.json", json.dumps(runs, indent=2) + "\n")
        print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return text


if __name__ == "__main__":
    main()
