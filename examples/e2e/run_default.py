"""The embedded default: tiny GPT-2 + synthetic E2E data through train (LoRA, DoRA, full) → generate → evaluate →
compare.

    python examples/e2e/run_default.py [--out runs/e2e-default]

Offline and CPU-sized (a few minutes on 2 cores). It trains LoRA in the paper's setup (q and v of c_attn), DoRA in
the same setup, LoRA on every linear layer (a common modern setup) and full fine-tuning, all from the same base. It
prints the training loss at the start and the end, the test scores of the base model before fine-tuning
("untrained": the tiny model after its language-model pretraining on the training references, before it has
seen any MR) and of each run, and the comparison (parameters, memory, time, scores); it exits with status 1
if the loss did not fall or LoRA did not beat the base. After the base is built, the runs and then the generations
go in processes of their own, one a core, one thread each, their output in OUT/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import compare
import metrics
import torch
import train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

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
# The base is built before the runs, alone: two threads (fixed, so that it is the same base on any machine with the
# same instruction set) build it 1.5x faster than one on 2 cores.
BASE_THREADS = 2


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


def workers() -> int:
    """Processes at a time: one a core (each runs one thread)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_jobs(jobs: dict[str, list[str]], logs: Path, at_once: int) -> list[str]:
    """Run each job (name -> a script and its arguments) in a process of its own, ``at_once`` at a time, its output
    in ``logs/NAME.log``; the names of those that failed (exit status other than 0), or every name not finished if
    this process was told to stop (SIGINT, SIGTERM: passed on to the running jobs, which stop politely)."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    waiting, running, failed, stop = list(jobs), {}, [], []

    def on_signal(number: int, _frame) -> None:
        stop.append(number)
        for process, _, _ in running.values():
            process.send_signal(number)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (waiting and not stop):
            while waiting and len(running) < at_once and not stop:
                name = waiting.pop(0)
                handle = open(logs / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed when it ends)
                command = [sys.executable, str(HERE / jobs[name][0]), *jobs[name][1:]]
                process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)  # signals reach it through on_signal only
                running[name] = (process, handle, time.perf_counter())
                print(f"  {name}: started", flush=True)
            for name, (process, handle, began) in list(running.items()):
                if process.poll() is None:
                    continue
                handle.close()
                del running[name]
                if process.returncode:
                    failed.append(name)
                    tail = "".join((logs / f"{name}.log").read_text(errors="replace").splitlines(True)[-15:])
                    print(f"  {name}: FAILED (exit status {process.returncode}); the end of {logs / name}.log:\n"
                          f"{tail}", file=sys.stderr, flush=True)
                else:
                    ended = "stopped after" if stop else "done in"
                    print(f"  {name}: {ended} {time.perf_counter() - began:.0f} s", flush=True)
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return failed + (waiting if stop else [])


def build_base(base: Path, recipe: list[str], quiet: list[str]) -> None:
    """The tiny base every run starts from (train.py's ``--model tiny`` pretraining), built once, here."""
    args = train.parse_args(["--model", "tiny", "--out", str(base), *TRAIN_ARGS, *recipe, *quiet])
    torch.set_num_threads(BASE_THREADS)
    torch.manual_seed(args.seed)
    examples = common.load_examples(args.data, args.split, args.data_dir, args.cache_dir, args.seed)
    train.pretrain_tiny(args, examples, base)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, began = Path(args.out), time.perf_counter()
    recipe = ["--recipe", args.recipe]
    runs = {name: out / name for name in SETUPS}
    base = out / "base"  # every run starts from it
    shutil.rmtree(base, ignore_errors=True)  # never a stale base from an earlier version
    build_base(base, recipe, ["--no-progress"] if args.no_progress else [])
    print(f"built the tiny base in {time.perf_counter() - began:.0f} s; training {len(SETUPS)} runs, "
          f"{workers()} at a time (one thread each):", flush=True)
    for run in runs.values():  # a run that ends without its run.json did not finish
        (run / "run.json").unlink(missing_ok=True)
    quiet = ["--no-progress"]  # the jobs write to their logs
    jobs = {name: ["train.py", "--model", str(base), "--out", str(run), *setup, *TRAIN_ARGS, *recipe, *quiet]
            for (name, run), setup in zip(runs.items(), SETUPS.values(), strict=True)}
    if run_jobs(jobs, out / "logs", workers()) or not all((run / "run.json").is_file() for run in runs.values()):
        print(f"not every run finished: see the logs in {out / 'logs'}", file=sys.stderr)
        return 1
    tests = {"untrained": (out / "untrained" / "test", ["--run", str(runs["lora"]), "--no-adapter"]),
             **{name: (run / "test", ["--run", str(run)]) for name, run in runs.items()}}
    print("generating and scoring:", flush=True)
    if metrics.coco_unavailable() is None:
        metrics.meteor()  # METEOR's server loads its paraphrase table (seconds) while the generations run
    jobs = {f"{name}-test": ["generate.py", *extra, "--data", "synthetic", "--split", "test", "--limit", TEST_MRS,
                             "--batch-size", TEST_MRS, "--threads", "1", "--out", str(folder), *recipe, *quiet]
            for name, (folder, extra) in tests.items()}
    if run_jobs(jobs, out / "logs", workers()):
        print(f"not every generation finished: see the logs in {out / 'logs'}", file=sys.stderr)
        return 1
    scores = {name: evaluate(folder) for name, (folder, _) in tests.items()}
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
