"""The embedded default: tiny GPT-2 + synthetic E2E data through train (two LoRA setups, full) → generate → evaluate →
compare.

    python examples/e2e/run_default.py [--out runs/e2e-default]

Offline and CPU-sized (a few minutes on 2 cores). It trains LoRA in the paper's setup (q and v of c_attn), DoRA in
the same setup, LoRA on every linear layer (a common modern setup) and full fine-tuning, all from the same base. It
prints the training loss at the start and the end, the test scores of the base model before fine-tuning
("untrained": the tiny model after its language-model pretraining on the training references, before it has
seen any MR) and of each run, and the comparison (parameters, memory, time, scores); it exits with status 1
if the loss did not fall or LoRA did not beat the base.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import compare
import generate
import metrics
import train

# Smoke-scale settings (the paper's are train.py's defaults): a short run needs a higher learning rate;
# one thread per process: the tiny model's matrices are too small to gain from more, and a busy machine loses.
TRAIN_ARGS = ["--data", "synthetic", "--max-steps", "500", "--warmup-steps", "30", "--save-every", "250",
              "--log-every", "25", "--tiny-pretrain-steps", "300", "--threads", "1"]
# Run name -> train.py arguments: the paper's LoRA setup, DoRA in the same setup, LoRA on every linear layer, full
# fine-tuning (last: the baseline of the comparison).
SETUPS = {
    "lora": ["--method", "lora", "--lr", "4e-3"],
    "dora": ["--method", "lora", "--dora", "--lr", "4e-3"],
    "lora-all-linear": ["--method", "lora", "--lr", "4e-3", "--lora-target", "all-linear", "--lora-slices", "q,k,v"],
    "full": ["--method", "full", "--lr", "1e-3"],
}
TEST_MRS = "50"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/e2e-default", help="output folder (runs are overwritten)")
    p.add_argument("--recipe", choices=common.RECIPES, default="paper",
                   help="paper (fp32, as the LoRA paper) or bf16 (bf16 autocast in training, a bf16 model in beams)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def evaluate(folder: Path) -> dict[str, float]:
    """Score folder/outputs.txt against folder/refs.txt and save folder/scores.json."""
    scores = metrics.score(metrics.read_grouped_refs(folder / "refs.txt"), metrics.read_outputs(folder / "outputs.txt"))
    common.write_atomic(folder / "scores.json", json.dumps(scores) + "\n")
    return scores


def losses(run: Path) -> tuple[float, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return records[0]["loss"], records[-1]["loss"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, began = Path(args.out), time.perf_counter()
    quiet = ["--no-progress"] if args.no_progress else []
    recipe = ["--recipe", args.recipe]
    runs = {name: out / name for name in SETUPS}
    base = out / "base"  # the first run builds (and pretrains) the tiny base here; every run starts from it
    shutil.rmtree(base, ignore_errors=True)  # never a stale base from an earlier version
    for name, setup in SETUPS.items():
        model = ["--model", "tiny", "--tiny-base", str(base)] if name == "lora" else ["--model", str(base)]
        if not train.main([*model, "--out", str(runs[name]), *setup, *TRAIN_ARGS, *recipe, *quiet]):
            print(f"stopped during the {name} run", file=sys.stderr)  # by SIGINT/SIGTERM
            return 1
    scores = {}
    for name, extra in [("untrained", ["--run", str(runs["lora"]), "--no-adapter"]),
                        *((name, ["--run", str(run)]) for name, run in runs.items())]:
        folder = out / name / "test" if name == "untrained" else runs[name] / "test"
        generate.main([*extra, "--data", "synthetic", "--split", "test", "--limit", TEST_MRS, "--batch-size", TEST_MRS,
                       "--threads", "1", "--out", str(folder), *recipe, *quiet])
        scores[name] = evaluate(folder)
    compare.main([*map(str, runs.values()), "--out", str(out / "compare")])
    first, last = losses(runs["lora"])
    print(f"LoRA training loss (label-smoothed): {first:.3f} at the start -> {last:.3f} at the end")
    for name, values in scores.items():
        print(f"{name:>15} test scores: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    print(f"total time {time.perf_counter() - began:.0f} s; outputs under {out}")
    ok = last < 0.8 * first and scores["lora"]["BLEU"] > scores["untrained"]["BLEU"] + 0.1
    print("OK: the loss fell and LoRA beats the untrained model" if ok else "FAILED: no clear improvement")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
