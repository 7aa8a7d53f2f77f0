"""The triton forward with the persistent TMA GEMM (``FASTLORA_TRITON_GEMM=hopper``) against the tiled one and cuBLAS.

Run: ``python benchmarks/bench_hopper.py [--budget-s S] [--dry-run]``. Per shape (bf16, nn.Linear weight with bias,
LoRA r=16 in bf16, dropout 0.1, tokens in {16384, 65536} x in->out in SHAPES), timed side by side with CUDA events,
eager and replayed from a CUDA graph (the GPU's time alone):

- ``cublas``: ``F.linear(x, W, b)``, the floor;
- ``tiled`` / ``hopper``: the triton backend's forward (down kernel + GEMM) with either GEMM;
- ``tiled gemm`` / ``hopper gemm``: the GEMM launch alone, h precomputed;
- ``cublas dx``: ``dy @ W``; ``tiled dx`` / ``hopper dx``: the backward's dx GEMM launch alone (dx only asked for,
  the rank-R term and dropout mask fused).

Rows (benchmark ``hopper``): ``time`` and ``graph time`` ms with the ratio to ``cublas`` (``cublas dx`` for the dx
rows), ``rel err`` of both forwards and both dx against fp32 references on the first rows; each case's parameters
record whether the hopper route launched the persistent kernels. That every config the autotuner may pick is
correct is a test (tests/test_gpu_checks.py). Starts no new shape after ``--budget-s`` seconds. ``--dry-run``: a
tiny fp16 shape on the CPU under ``TRITON_INTERPRET=1`` (numbers meaningless, no graphs), every code path.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if "--dry-run" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastlora imports triton
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import internals
from contenders import Spec, make_tensors
from measure import graph_side_by_side, side_by_side
from runner import Run, arguments, table

SHAPES = [(1024, 3072), (1024, 4096), (4096, 1024), (4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
TOKENS = (16384, 65536)
RANK, P, ALPHA = 16, 0.1, 32.0
REFERENCE_ROWS = 1024
FORWARD = ("cublas", "tiled", "hopper", "tiled gemm", "hopper gemm")
DX = ("cublas dx", "tiled dx", "hopper dx")


def hopper_tensors(spec: Spec) -> dict[str, torch.Tensor]:
    """x, W, b, A, B, dy and a dropout seed for ``spec``, none requiring grad (the launches here skip autograd)."""
    t = make_tensors(spec)
    return {"x": t.x.detach(), "w": t.weight, "b": t.bias, "A": t.lora_A.detach(), "B": t.lora_B.detach(),
            "dy": t.grads[0], "seed": torch.tensor(1234, device=spec.device)}


def reference_error(t: dict, y: torch.Tensor, grad: bool = False) -> float:
    """Relative Frobenius error of the first rows of ``y`` (or of dx, ``grad``) against fp32 references with the
    same dropout mask."""
    reference = internals.backend("reference")
    rows = min(REFERENCE_ROWS, y.shape[0])
    x = t["x"][:rows].float()
    args = (x, t["w"].float(), t["b"].float(), t["A"].float(), t["B"].float(), ALPHA / RANK, P, t["seed"].cpu())
    no_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        if grad:
            expected = reference.backward(t["dy"][:rows].float(), *args[:2], *args[3:], (True, False, False))[0]
        else:
            expected = reference.forward(*args)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = no_tf32
    return ((y[:rows].float() - expected).norm() / expected.norm()).item()


def measure_shape(run: Run, spec: Spec, rounds: int, calls: int) -> list[dict]:
    """Every contender on one shape: errors, which route ran, eager and graph times; returns the rows recorded."""
    t = hopper_tensors(spec)
    layer = (t["x"], t["w"], t["b"], t["A"], t["B"], spec.scale, P, t["seed"])
    dx_args = (t["dy"], t["x"], t["w"], t["A"], t["B"], spec.scale, P, t["seed"])
    saved = internals.triton_saved_for_dx(*layer)
    fns = {"cublas": lambda: F.linear(t["x"], t["w"], t["b"]),
           "tiled": lambda: internals.triton_forward("tiled", *layer),
           "hopper": lambda: internals.triton_forward("hopper", *layer),
           "tiled gemm": internals.triton_gemm_alone("tiled", *layer),
           "hopper gemm": internals.triton_gemm_alone("hopper", *layer),
           "cublas dx": lambda: t["dy"] @ t["w"],
           "tiled dx": lambda: internals.triton_dx("tiled", *dx_args, saved),
           "hopper dx": lambda: internals.triton_dx("hopper", *dx_args, saved)}
    launched = internals.hopper_launches(lambda: (fns["hopper"](), fns["hopper dx"]()))
    params = {**spec.params(), "hopper_route": {"forward": "gemm" in launched, "dx": "dx" in launched}}
    errors = {kind: reference_error(t, fns[kind]()) for kind in ("tiled", "hopper")}
    errors.update({kind: reference_error(t, fns[kind](), grad=True) for kind in ("tiled dx", "hopper dx")})
    first = len(run.rows)
    timings = [("time", side_by_side(fns, rounds, spec.device, calls=calls, warmup=2))]
    if spec.device == "cuda":
        timings.append(("graph time", graph_side_by_side(fns, rounds, calls)))
    for metric, samples in timings:
        for names in (FORWARD, DX):
            run.record_times(spec.label, params, {n: samples[n] for n in names if n in samples}, baseline=names[0],
                             device=spec.device, metric=metric)
    run.record_group(spec.label, params, "rel err", "", errors, device=spec.device)
    return run.rows[first:]


def main(argv: list[str] | None = None) -> Run:
    argv = sys.argv[1:] if argv is None else argv
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny fp16 shape on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--budget-s", type=float, default=50.0, help="start no new shape after this many seconds")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        sys.exit("bench_hopper.py needs a CUDA GPU (use --dry-run to exercise it on CPU)")
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        sys.exit("bench_hopper.py needs an sm_90+ GPU (TMA and wgmma)")
    shapes, tokens, dtype, rounds, calls = SHAPES, TOKENS, "bfloat16", 5, 2
    if args.dry_run:
        shapes, tokens, dtype, rounds, calls = [(64, 48)], (40,), "float16", 2, 1
    start = time.monotonic()
    run = Run("hopper", __file__, argv, args.csv)
    print(run.describe(device), flush=True)
    cases = [Spec(m, n_in, n_out, RANK, P, dtype, device, scale=ALPHA / RANK) for m in tokens for n_in, n_out in shapes]
    for i, spec in enumerate(cases):
        if time.monotonic() - start > args.budget_s:
            print("not run (budget): " + ", ".join(s.label for s in cases[i:]))
            break
        print(table(measure_shape(run, spec, rounds, calls)) + f"{time.monotonic() - start:.0f}s", flush=True)
    print("autotuned configs:", json.dumps(internals.tuned_configs()))
    print(f"{len(run.rows)} rows appended to {args.csv}")
    return run


if __name__ == "__main__":
    main()
