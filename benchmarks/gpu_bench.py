"""GPU timing of the triton backend: the LoRA layer vs cuBLAS and eager PyTorch, a GPT-2 training step vs peft.

Layer: bf16, GPT-2 Medium/Large projection shapes, M tokens in {2048, 8192, 16384}, r in {4, 16},
dropout 0 and 0.1. Contenders, timed interleaved (order rotating every round) with CUDA events,
medians of the rounds:

- ``plain``: ``F.linear(x, W, b)`` (cuBLAS), the floor; its forward+backward computes dx only.
- ``unfused``: the eager peft-style ``base(x) + B(A(dropout(x))) * scale`` with ``torch`` dropout.
- ``fastlora``: :func:`fastlora.lora_linear` on the triton backend.

Each case is timed twice: eager, as a program makes the calls (host launch overhead included),
and replayed from a CUDA graph of the same calls (the GPU's time alone), so that a ratio can be
told apart into kernel time and host overhead. The autotuner's chosen tiles are recorded too.

Training step: :func:`train_step.measure_step` on GPT-2 Medium shapes (random weights from the
config), batch 8 x 1024 tokens, bf16 autocast, LoRA r=4, alpha=32, dropout 0.1 on ``c_attn``
(fastlora and loralib on q and v, peft on q, k and v, as is and through ``fastlora.accelerate``), AdamW,
and the frozen floor (no adapter: what a step costs if the LoRA layers were free), timed in interleaved
rounds; tokens/s, peak memory above the model's, bytes saved for backward.

``--dry-run`` runs every code path but the CUDA graphs on tiny fp32 shapes on the CPU under
``TRITON_INTERPRET=1`` (numbers meaningless, graph columns n/a). Results go to ``--out``:
``gpu_bench.json`` and ``gpu_bench.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_times

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastlora imports triton
os.environ.setdefault("FASTLORA_BACKEND", "triton")  # an unavailable triton backend is an error, not a fallback

import fastlora  # noqa: E402

SHAPES = {  # name: (in_features, out_features)
    "gpt2-medium c_attn": (1024, 3072),
    "gpt2-medium mlp.c_fc": (1024, 4096),
    "gpt2-medium mlp.c_proj": (4096, 1024),
    "gpt2-large c_attn": (1280, 3840),
    "gpt2-large mlp.c_fc": (1280, 5120),
}
TOKENS = (2048, 8192, 16384)
RANKS = (4, 16)
DROPOUTS = (0.0, 0.1)
ALPHA = 32.0


def timed_median(fns: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds of ``iters`` calls."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: s * 1e3 for name, s in median_times(fns, rounds, iters, device, warmup=2).items()}


def _captured(fn: Callable[[], object], iters: int) -> torch.cuda.CUDAGraph:
    """``iters`` calls of fn captured in one CUDA graph (warmed up on a side stream, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return graph


def graph_median(fns: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, float | None]:
    """Median milliseconds per call of each function replayed from a CUDA graph, in interleaved rounds:
    the GPU's time without the host's launch overhead. None where there is no GPU or capture failed."""
    if not torch.cuda.is_available():
        return dict.fromkeys(fns)
    graphs = {}
    for name, fn in fns.items():
        try:
            graphs[name] = _captured(fn, iters)
        except Exception as error:  # a contender that cannot be captured keeps its eager time only
            print(f"  {name}: CUDA graph capture failed: {error!r}", flush=True)
            torch.cuda.synchronize()
    per_replay = timed_median({name: graph.replay for name, graph in graphs.items()}, rounds, 1) if graphs else {}
    del graphs
    return {name: per_replay[name] / iters if name in per_replay else None for name in fns}


def layer_inputs(n_in: int, n_out: int, tokens: int, rank: int, dtype: torch.dtype, device: str) -> dict:
    """A GPT-2 style layer: Conv1D weight (in, out) used as its (out, in) transpose, adapter, x, dy."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        t = torch.randn(*shape, generator=gen, device=device) * scale
        return t.to(dtype).requires_grad_(grad)

    return {
        "x": rand(tokens, n_in, grad=True),
        "weight": rand(n_in, n_out, scale=n_in**-0.5).t(),
        "bias": rand(n_out, scale=0.1),
        "lora_A": rand(rank, n_in, scale=n_in**-0.5, grad=True),
        "lora_B": rand(n_out, rank, scale=rank**-0.5, grad=True),
        "dy": rand(tokens, n_out),
    }


def layer_fns(t: dict, p: float, scale: float) -> dict[str, dict[str, Callable[[], object]]]:
    """For each mode, each contender's call on the tensors ``t``."""
    x, weight, bias, A, B, dy = (t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "dy"))

    def plain():
        return F.linear(x, weight, bias)

    def unfused():  # peft: nn.Identity instead of dropout when p == 0
        x_lora = F.dropout(x, p, training=True) if p > 0 else x
        return F.linear(x, weight, bias) + F.linear(F.linear(x_lora, A), B) * scale

    def fused():
        return fastlora.lora_linear(x, weight, bias, A, B, scale, p)

    def forward_only(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    def forward_backward(fn, inputs):
        return lambda: torch.autograd.grad(fn(), inputs, dy)

    lora_inputs = (x, A, B)
    return {
        "forward": {"plain": forward_only(plain), "unfused": forward_only(unfused), "fastlora": forward_only(fused)},
        "forward+backward": {"plain": forward_backward(plain, (x,)), "unfused": forward_backward(unfused, lora_inputs),
                             "fastlora": forward_backward(fused, lora_inputs)},
    }


def check_layer(t: dict, scale: float) -> float:
    """fastlora's relative error against the fp32 unfused computation (dropout off), as a sanity check."""
    with torch.no_grad():
        f32 = {k: v.float() for k, v in t.items()}
        update = (f32["x"] @ f32["lora_A"].t()) @ f32["lora_B"].t() * scale
        expected = F.linear(f32["x"], f32["weight"], f32["bias"]) + update
        got = fastlora.lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scale, 0.0).float()
        return ((got - expected).norm() / expected.norm()).item()


def bench_layers(args, dtype: torch.dtype, device: str, record: Callable[[str, object], None]) -> None:
    rows = []
    for shape_name, (n_in, n_out) in args.shapes.items():
        for tokens in args.tokens:
            for rank in args.ranks:
                t = layer_inputs(n_in, n_out, tokens, rank, dtype, device)
                scale = ALPHA / rank
                error = check_layer(t, scale)
                for p in args.dropouts:
                    for mode, fns in layer_fns(t, p, scale).items():
                        ms = timed_median(fns, args.rounds, args.iters)
                        graph_ms = graph_median(fns, args.rounds, args.iters)
                        row = {"shape": shape_name, "in": n_in, "out": n_out, "tokens": tokens, "r": rank, "p": p,
                               "mode": mode, "ms": ms, "graph_ms": graph_ms, "fastlora_rel_err_p0": error,
                               "fastlora/plain": ms["fastlora"] / ms["plain"],
                               "unfused/fastlora": ms["unfused"] / ms["fastlora"],
                               "graph fastlora/plain": _ratio(graph_ms["fastlora"], graph_ms["plain"]),
                               "graph unfused/fastlora": _ratio(graph_ms["unfused"], graph_ms["fastlora"])}
                        rows.append(row)
                        print(f"{shape_name:24s} M={tokens:6d} r={rank:2d} p={p:.1f} {mode:17s} "
                              + " ".join(f"{k}={v:.4f}ms" for k, v in ms.items())
                              + f"  fastlora/plain={row['fastlora/plain']:.3f} unfused/fastlora="
                              f"{row['unfused/fastlora']:.3f} graph: fastlora/plain={_fmt(row['graph fastlora/plain'])}"
                              f" unfused/fastlora={_fmt(row['graph unfused/fastlora'])} err={error:.1e}", flush=True)
                        record("layers", rows)
                        record("tuned_configs", tuned_configs())
                del t


def tuned_configs() -> list[dict]:
    """The triton backend's autotuning choices so far (none under the interpreter, which does not tune)."""
    from fastlora.ops.triton import tuned_configs as chosen

    return chosen()


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def bench_training(args, record: Callable[[str, object], None]) -> None:
    """benchmarks/train_step.py's LoRA step (q,v r=4 for fastlora and loralib, q,k,v for peft) and its frozen
    floor, interleaved: tokens/s, peak memory above the model's, bytes saved for backward."""
    from train_step import StepCase, measure_step, overhead_over_floor

    results = measure_step(StepCase(**args.step_case), repeats=args.repeats, warmup=args.warmup_steps)
    overhead = overhead_over_floor(results)
    summary = {}
    for r in results:
        ok = r.status == "ok"
        summary[r.variant] = {
            "status": r.status, "reason": r.reason, "tokens_per_s": r.tokens_per_s if ok else None,
            "overhead_over_floor": overhead.get(r.variant), "trainable": r.trainable,
            "peak_mib": r.peak_bytes / 2**20 if r.peak_bytes is not None else None,
            "saved_mib": r.saved_bytes / 2**20 if r.saved_bytes is not None else None}
        measured = (f"{r.tokens_per_s:10.0f} tok/s  peak {_fmt(summary[r.variant]['peak_mib'], 0)} MiB  "
                    f"over floor {_fmt(overhead.get(r.variant))}") if ok else f"{r.status}: {r.reason}"
        print(f"train step {r.variant:15s} {measured}", flush=True)
    record("training", {"case": args.step_case, "variants": summary})


def markdown(layers: list[dict], training: dict | None, env: dict, tuned: list[dict]) -> str:
    lines = [f"GPU: {env['device']}; torch {env['torch']}, triton {env['triton']}; {env['date']}", "",
             "Eager: calls timed as a program makes them (host launch overhead included). Graph: the same calls "
             "replayed from a CUDA graph, the GPU's time alone.", "",
             "| shape | M | r | p | mode | plain ms | unfused ms | fastlora ms | fastlora/plain | unfused/fastlora "
             "| graph plain ms | graph fastlora ms | graph fastlora/plain | graph unfused/fastlora |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in layers:
        ms, graph = r["ms"], r.get("graph_ms") or {}
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['r']} | {r['p']} | {r['mode']} | {ms['plain']:.4f} | "
                     f"{ms['unfused']:.4f} | {ms['fastlora']:.4f} | {r['fastlora/plain']:.3f} | "
                     f"{r['unfused/fastlora']:.3f} | {_fmt(graph.get('plain'), 4)} | "
                     f"{_fmt(graph.get('fastlora'), 4)} | {_fmt(r.get('graph fastlora/plain'))} | "
                     f"{_fmt(r.get('graph unfused/fastlora'))} |")
    if training:
        variants, case = training["variants"], training["case"]
        peft = variants.get("peft", {})
        lines += ["", f"Training step: GPT-2 {case['size']} shapes, batch {case['batch']} x {case['seq']} tokens, "
                  f"{case['autocast'] or 'no'} autocast, r=4, alpha=32, dropout 0.1 (benchmarks/train_step.py)", "",
                  "| variant | tokens/s | over floor | peak MiB | saved MiB | trainable | tokens/s vs peft "
                  "| peak vs peft |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in variants.items():
            if v["status"] != "ok":
                lines.append(f"| {name} | {v['status']}: {v['reason'][:80]} | | | | | | |")
                continue
            lines.append(f"| {name} | {v['tokens_per_s']:.0f} | {_fmt(v['overhead_over_floor'])} | "
                         f"{_fmt(v['peak_mib'], 0)} | {_fmt(v['saved_mib'], 0)} | {v['trainable']} | "
                         f"{_fmt(_ratio(v['tokens_per_s'], peft.get('tokens_per_s')))} | "
                         f"{_fmt(_ratio(v['peak_mib'], peft.get('peak_mib')))} |")
    if tuned:
        lines += ["", "Autotuned tiles (kernel, family, padded rank, key: tile, warps, stages):", ""]
        lines += [f"- {c['kernel']} {c['family']} r_pad={c['r_pad']} {c['key']}: {c['tile']}, "
                  f"{c['num_warps']} warps, {c['num_stages']} stages" for c in tuned]
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1 dry run)"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__, "fastlora": fastlora.__version__,
            "cuda": torch.version.cuda, "date": date,
            "backends": {k: (v.available, v.reason) for k, v in fastlora.backends().items()}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny fp32 shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    args.shapes, args.tokens, args.ranks, args.dropouts = SHAPES, TOKENS, RANKS, DROPOUTS
    args.rounds, args.iters = 7, 10
    args.step_case = {"size": "medium", "batch": 8, "seq": 1024, "device": "cuda", "autocast": "bfloat16"}
    args.warmup_steps, args.repeats = 3, 7
    if args.dry_run:
        args.shapes, args.tokens, args.ranks = {"tiny": (64, 96)}, (40,), (4,)
        args.rounds, args.iters = 2, 1
        args.step_case = {"size": "small", "batch": 1, "seq": 8, "n_layer": 1, "device": "cpu", "autocast": None}
        args.warmup_steps, args.repeats = 1, 1
    return args


def main() -> None:
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        sys.exit("gpu_bench.py needs a CUDA GPU (use --dry-run to exercise it on CPU)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"environment": environment(device)}
    print(json.dumps(results["environment"], indent=1), flush=True)

    def record(key: str, value: object) -> None:
        """Save everything measured so far: a run cut short by a timeout still leaves its numbers."""
        results[key] = value
        (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
        table = markdown(results.get("layers", []), results.get("training"), results["environment"],
                         results.get("tuned_configs", []))
        (args.out / "gpu_bench.md").write_text(table)

    if not args.skip_training:  # first: the end-to-end targets matter most if time runs out
        try:
            bench_training(args, record)
        except Exception as error:  # keep going to the layer timings
            record("training_error", repr(error))
            print(f"training step benchmark failed: {error!r}", flush=True)
    if not args.skip_layers:
        bench_layers(args, dtype, device, record)
    print((args.out / "gpu_bench.md").read_text() if (args.out / "gpu_bench.md").exists() else "nothing measured")


if __name__ == "__main__":
    main()
