"""The triton forward with the persistent TMA GEMM (``FASTLORA_TRITON_GEMM=hopper``) against the tiled one and cuBLAS.

First correctness: every config the autotuner may pick for the hopper kernel, launched directly at one
odd-sized shape, against an fp32 reference (a config the autotuner never picks here could be picked
elsewhere). Then, per shape (bf16, nn.Linear weight with bias, LoRA r=16 in bf16, dropout 0.1, tokens in
{16384, 65536} x in->out in SHAPES), timed interleaved with CUDA events (medians of the rounds), eager and
replayed from a CUDA graph (the GPU's time alone):

- ``cublas``: ``F.linear(x, W, b)``, the floor;
- ``tiled`` / ``hopper``: the triton backend's forward (down kernel + GEMM) with either GEMM;
- ``tiled gemm`` / ``hopper gemm``: the GEMM launch alone, h precomputed;
- ``cublas dx``: ``dy @ W``; ``tiled dx`` / ``hopper dx``: the backward's dx GEMM launch alone (dx only asked for,
  the rank-R term and dropout mask fused).

Each row also gives the relative error of both forwards and both dx against fp32 references on the first rows. Stops
starting new shapes after ``--budget-s`` seconds. Writes ``hopper_bench.md`` and ``hopper_bench.json`` to
``--out`` (atomically, after every shape). ``--dry-run``: tiny fp16 shapes on CPU under TRITON_INTERPRET=1
(numbers meaningless, no graphs), to exercise every code path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastlora imports triton

import triton  # noqa: E402
from gpu_bench import graph_median, timed_median  # noqa: E402

from fastlora.atomic import write_atomic  # noqa: E402
from fastlora.ops import triton as triton_backend  # noqa: E402

SHAPES = [(1024, 3072), (1024, 4096), (4096, 1024), (4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
TOKENS = (16384, 65536)
RANK, P, ALPHA = 16, 0.1, 32.0
REFERENCE_ROWS = 1024


def layer(tokens: int, n_in: int, n_out: int, dtype: torch.dtype, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)
    return {"x": rand(tokens, n_in), "w": rand(n_out, n_in, scale=n_in**-0.5), "b": rand(n_out),
            "A": rand(RANK, n_in, scale=n_in**-0.5), "B": rand(n_out, RANK, scale=RANK**-0.5),
            "dy": rand(tokens, n_out), "seed": torch.tensor(1234, device=device)}


def forward(t: dict, gemm: str) -> torch.Tensor:
    triton_backend.set_gemm(gemm)
    return triton_backend.forward(t["x"], t["w"], t["b"], t["A"], t["B"], ALPHA / RANK, P, t["seed"])


def dx(t: dict, gemm: str, saved: tuple) -> torch.Tensor:
    triton_backend.set_gemm(gemm)
    return triton_backend.backward(t["dy"], t["x"], t["w"], t["A"], t["B"], ALPHA / RANK, P, t["seed"],
                                   (True, False, False), None, saved)[0]


def saved_for_dx(t: dict) -> tuple:
    """What the forward prepares for a backward that asks for dx alone."""
    return triton_backend.forward_for_backward(t["x"], t["w"], t["b"], t["A"], t["B"], ALPHA / RANK, P, t["seed"],
                                               None, (True, False, False))[1]


def contenders(t: dict) -> dict[str, Callable[[], object]]:
    x, w, b = t["x"], t["w"], t["b"]
    layout = triton_backend._layout(x.shape[0], w.shape[0], RANK, None, x.device.index or 0)
    h = triton_backend._down(x, t["A"], t["B"], layout, triton_backend._dropout_args(P, t["seed"]))

    def gemm_alone(kind: str) -> Callable[[], object]:
        def run():
            triton_backend.set_gemm(kind)
            return triton_backend._gemm(x, w, b, t["B"], h, ALPHA / RANK, layout)
        return run
    saved = saved_for_dx(t)
    return {"cublas": lambda: F.linear(x, w, b), "tiled": lambda: forward(t, "tiled"),
            "hopper": lambda: forward(t, "hopper"), "tiled gemm": gemm_alone("tiled"),
            "hopper gemm": gemm_alone("hopper"), "cublas dx": lambda: t["dy"] @ w,
            "tiled dx": lambda: dx(t, "tiled", saved), "hopper dx": lambda: dx(t, "hopper", saved)}


def reference_error(t: dict, y: torch.Tensor, grad: bool = False) -> float:
    """Relative Frobenius error of the first rows of ``y`` (or of dx, ``grad``) against fp32 references with the
    same dropout mask."""
    from fastlora.ops import reference

    rows = min(REFERENCE_ROWS, y.shape[0])
    x = t["x"][:rows].float()
    args = (x, t["w"].float(), t["b"].float(), t["A"].float(), t["B"].float(), ALPHA / RANK, P, t["seed"].cpu())
    no_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        if grad:
            expected = reference.backward(t["dy"][:rows].float(), *args[:2], *args[3:], (True, False, False))[0]
        else:
            expected = reference.forward(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = no_tf32
    return ((y[:rows].float() - expected).norm() / expected.norm()).item()


def check_every_config(device: str) -> list[dict]:
    """Each config of the hopper kernel, launched directly, against the fp32 reference: on the GPU at the first
    shape's in and out features (so that the kernels compiled here serve its timing too) and 1100 rows (a partial
    row tile; below the large-M bound the small-M config)."""
    from fastlora.ops.triton import _hopper

    t = layer(1100, *SHAPES[0], torch.bfloat16, device) if device == "cuda" else layer(70, 40, 48, torch.float16,
                                                                                        device)
    x, w = t["x"], t["w"]
    layout = triton_backend._layout(x.shape[0], w.shape[0], RANK, None, x.device.index or 0)
    h = triton_backend._down(x, t["A"], t["B"], layout, triton_backend._dropout_args(P, t["seed"]))
    if device == "cuda":
        sms, smem = triton_backend._sm_count(x.device.index), triton_backend._smem_limit(x.device.index)
        configs = _hopper._configs("large", layout.h_pad, smem) + _hopper._configs("small-m", layout.h_pad, smem)
    else:
        sms, configs = _hopper.INTERPRET_SMS, [None]
    rows = []
    for config in configs:
        out = x.new_empty(x.shape[0], w.shape[0])
        if config is None:
            _hopper.gemm(x, w, t["b"], t["B"], h, ALPHA / RANK, layout, out, sms, 232448)
            name = "interpreter"
        else:
            triton.set_allocator(_hopper._scratch)
            grid = (min(sms, triton.cdiv(x.shape[0], config.kwargs["BLOCK_M"])
                        * triton.cdiv(w.shape[0], config.kwargs["BLOCK_N"])),)
            _hopper._hopper_forward_kernel[grid](
                x, w, h, t["B"], t["b"], out, x.shape[0], w.shape[0], x.shape[1], RANK, layout.group_rows,
                x.stride(0), w.stride(0), *t["B"].stride(), out.stride(0), ALPHA / RANK, HAS_BIAS=True, W_T=False,
                RS_PAD=layout.rs_pad, H_PAD=layout.h_pad, GROUPS=1, SLICE_MASK=1, **config.all_kwargs())
            name = f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"
        error = reference_error(t, out)
        rows.append({"config": name, "rel_err": error, "ok": error <= 1e-2})
        print(f"  config {name}: rel err {error:.2e}", flush=True)
    return rows


def routed_to_hopper(t: dict, saved: tuple) -> dict[str, bool]:
    """Whether the forward and dx with ``hopper`` chosen launch the persistent kernels for this layer."""
    hopper, launched = triton_backend._hopper, []
    launches = {"gemm": hopper.gemm, "dx": hopper.dx}
    for name, launch in launches.items():
        setattr(hopper, name, lambda *args, name=name, launch=launch: launched.append(name) or launch(*args))
    try:
        forward(t, "hopper")
        dx(t, "hopper", saved)
    finally:
        for name, launch in launches.items():
            setattr(hopper, name, launch)
    return {"forward": "gemm" in launched, "dx": "dx" in launched}


def bench_shape(t: dict, rounds: int, iters: int, graphs: bool) -> dict:
    fns = contenders(t)
    saved = saved_for_dx(t)
    routed = routed_to_hopper(t, saved)
    errors = {kind: reference_error(t, forward(t, kind)) for kind in ("tiled", "hopper")}
    errors.update({f"{kind} dx": reference_error(t, dx(t, kind, saved), grad=True) for kind in ("tiled", "hopper")})
    ms = timed_median(fns, rounds, iters)
    graph_ms = graph_median(fns, rounds, iters) if graphs else dict.fromkeys(fns)
    return {"hopper_route": routed, "ms": ms, "graph_ms": graph_ms, "rel_err": errors}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "n/a"


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Hopper forward GEMM: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}",
             "", f"{env['dtype']}, nn.Linear weight + bias, LoRA r={RANK} (same dtype), dropout {P}. Times in ms "
             "(median of interleaved rounds, CUDA events); ratios to cuBLAS `F.linear`; eager includes host launch "
             "work, graph is replayed from a CUDA graph (GPU time alone); `gemm` rows time the GEMM launch alone.", "",
             "## Every hopper config, launched directly, against an fp32 reference", "",
             "| config | rel err | ok |", "|---|---|---|"]
    lines += [f"| {r['config']} | {r['rel_err']:.2e} | {r['ok']} |" for r in results.get("configs", [])]
    lines += ["", "## Forward", "",
              "| tokens | in->out | cublas ms | cublas graph ms | tiled/cublas | hopper/cublas | "
              "tiled gemm/cublas | hopper gemm/cublas | graph tiled/cublas | graph hopper/cublas | "
              "graph tiled gemm/cublas | graph hopper gemm/cublas | tiled dx/cublas dx | hopper dx/cublas dx | "
              "graph tiled dx/cublas dx | graph hopper dx/cublas dx | err tiled | err hopper | err tiled dx | "
              "err hopper dx |", "|" + "---|" * 20]
    for r in results.get("shapes", []):
        ms, graph, err = r["ms"], r["graph_ms"], r["rel_err"]
        cublas_graph = graph["cublas"]
        lines.append(
            f"| {r['tokens']} | {r['in']}->{r['out']} | {ms['cublas']:.4f} | "
            f"{'n/a' if cublas_graph is None else f'{cublas_graph:.4f}'} | "
            + " | ".join(_ratio(ms[k], ms["cublas"]) for k in ("tiled", "hopper", "tiled gemm", "hopper gemm"))
            + " | " + " | ".join(_ratio(graph[k], cublas_graph) for k in ("tiled", "hopper", "tiled gemm",
                                                                           "hopper gemm"))
            + " | " + " | ".join(_ratio(ms[f"{k} dx"], ms["cublas dx"]) for k in ("tiled", "hopper"))
            + " | " + " | ".join(_ratio(graph[f"{k} dx"], graph["cublas dx"]) for k in ("tiled", "hopper"))
            + " | " + " | ".join(f"{err[k]:.1e}" for k in ("tiled", "hopper", "tiled dx", "hopper dx")) + " |"
            + "".join(f" ({kind}: hopper n/a)" for kind, taken in r["hopper_route"].items() if not taken))
    if results.get("skipped"):
        lines += ["", f"Not run (budget): {', '.join(results['skipped'])}"]
    lines += ["", "Tuned configs (hopper): " + json.dumps(results.get("tuned_hopper", [])),
              "", "Tuned configs (tiled): " + json.dumps(results.get("tuned_tiled", []))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for hopper_bench.{md,json}")
    parser.add_argument("--dry-run", action="store_true", help="tiny fp16 shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--budget-s", type=float, default=50.0, help="start no new shape after this many seconds")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        sys.exit("hopper_bench.py needs a CUDA GPU (use --dry-run to exercise it on CPU)")
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        sys.exit("hopper_bench.py needs an sm_90+ GPU (TMA and wgmma)")
    shapes, tokens, dtype = SHAPES, TOKENS, torch.bfloat16
    rounds, iters = 5, 2
    if args.dry_run:
        shapes, tokens, dtype, rounds, iters = [(64, 48)], (40,), torch.float16, 2, 1
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1 dry run)",
        "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, "shapes": []}

    def save() -> None:
        results["tuned_hopper"] = triton_backend._hopper.tuned_configs()
        results["tuned_tiled"] = triton_backend.tuned_configs()
        write_atomic(args.out / "hopper_bench.json", json.dumps(results, indent=1))
        write_atomic(args.out / "hopper_bench.md", markdown(results))

    results["configs"] = check_every_config(device)
    save()
    cases = [(m, n_in, n_out) for m in tokens for n_in, n_out in shapes]
    for i, (m, n_in, n_out) in enumerate(cases):
        if time.monotonic() - start > args.budget_s:
            results["skipped"] = [f"{m}x{n_in}->{n_out}" for m, n_in, n_out in cases[i:]]
            break
        t = layer(m, n_in, n_out, dtype, device)
        row = {"tokens": m, "in": n_in, "out": n_out, **bench_shape(t, rounds, iters, device == "cuda")}
        results["shapes"].append(row)
        print(f"{m} {n_in}->{n_out}: " + ", ".join(f"{k} {v:.4f}" for k, v in row["ms"].items())
              + f" | errors {row['rel_err']} | {time.monotonic() - start:.0f}s", flush=True)
        del t
        save()
    save()
    print((args.out / "hopper_bench.md").read_text())

if __name__ == "__main__":
    main()
