"""Compare a LoRA run with a full fine-tuning run (same model and data): a Markdown table and a PNG chart.

    python examples/e2e/compare.py runs/lora-m runs/full-m --out runs/compare

Reads each run's ``run.json`` (written by train.py: trainable parameters, checkpoint bytes, peak training
memory, median step time, tokens/s, all measured in that run) and, when present, its E2E scores
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
# (label, run.json key, formatter); the ratio column is LoRA / full.
COSTS = (
    ("trainable parameters", "trainable_params", lambda v: f"{v:,}"),
    ("checkpoint bytes on disk", "checkpoint_bytes", lambda v: f"{v:,}"),
    ("peak training memory (MiB)", "peak_memory_bytes", lambda v: f"{v / 2**20:,.1f}"),
    ("median step time (ms)", "median_step_s", lambda v: f"{v * 1e3:,.1f}"),
    ("tokens/s", "tokens_per_s", lambda v: f"{v:,.0f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("lora_run")
    p.add_argument("full_run")
    p.add_argument("--lora-scores", help="E2E scores JSON of the LoRA run (default: LORA_RUN/test/scores.json)")
    p.add_argument("--full-scores", help="E2E scores JSON of the full run (default: FULL_RUN/test/scores.json)")
    p.add_argument("--out", help="folder for compare.md and compare.png (default: print only)")
    return p.parse_args(argv)


def load_run(run: str, scores: str | None) -> tuple[dict, dict | None]:
    info = common.read_json(Path(run) / "run.json")
    path = Path(scores) if scores else Path(run) / "test" / "scores.json"
    return info, common.read_json(path) if path.is_file() else None


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}x" if b else "n/a"


def table(lora: dict, full: dict, lora_scores: dict | None, full_scores: dict | None) -> str:
    """The Markdown comparison; E2E rows only for metrics both runs have."""
    if lora["base"] != full["base"]:
        print(f"warning: the runs used different base models ({lora['base']} vs {full['base']})", file=sys.stderr)
    lines = [f"LoRA vs full fine-tuning of {lora['model']} ({lora['device']}, {lora['world_size']} process(es); "
             f"memory: {lora['memory_kind']})", "",
             "| measure | LoRA | full | LoRA / full |", "| --- | ---: | ---: | ---: |"]
    for label, key, fmt in COSTS:
        lines.append(f"| {label} | {fmt(lora[key])} | {fmt(full[key])} | {ratio(lora[key], full[key])} |")
    if lora_scores and full_scores:
        for metric in (m for m in METRICS if m in lora_scores and m in full_scores):
            lines.append(f"| E2E {metric} | {lora_scores[metric]:.4f} | {full_scores[metric]:.4f} | "
                         f"{ratio(lora_scores[metric], full_scores[metric])} |")
    return "\n".join(lines) + "\n"


def chart(path: Path, lora: dict, full: dict, lora_scores: dict | None, full_scores: dict | None) -> None:
    """Left: LoRA/full ratios of the costs (log scale); right: both runs' E2E scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = [m for m in METRICS if lora_scores and full_scores and m in lora_scores and m in full_scores]
    fig, axes = plt.subplots(1, 2 if both else 1, figsize=(12 if both else 7, 4.5), squeeze=False)
    labels = [label for label, _, _ in COSTS]
    ratios = [lora[key] / full[key] if full[key] else float("nan") for _, key, _ in COSTS]
    ax = axes[0][0]
    ax.barh(labels, ratios, color="#4c72b0")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("LoRA / full (log scale; 1 = equal)")
    ax.set_title(f"Training cost, {lora['model']}")
    for y, value in enumerate(ratios):
        ax.annotate(f"{value:.3g}x", (value, y), xytext=(4, 0), textcoords="offset points", va="center")
    if both:
        ax = axes[0][1]
        x = range(len(both))
        ax.bar([i - 0.2 for i in x], [lora_scores[m] for m in both], width=0.4, label="LoRA")
        ax.bar([i + 0.2 for i in x], [full_scores[m] for m in both], width=0.4, label="full")
        ax.set_xticks(list(x), both)
        ax.set_title("E2E test scores")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    lora, lora_scores = load_run(args.lora_run, args.lora_scores)
    full, full_scores = load_run(args.full_run, args.full_scores)
    text = table(lora, full, lora_scores, full_scores)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        common.write_atomic(out / "compare.md", text)
        chart(out / "compare.png", lora, full, lora_scores, full_scores)
        common.write_atomic(out / "compare.json", json.dumps(
            {"lora": lora, "full": full, "lora_scores": lora_scores, "full_scores": full_scores}, indent=2) + "\n")
        print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return text


if __name__ == "__main__":
    main()
