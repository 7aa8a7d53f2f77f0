"""Mixed batches (forward, as in serving): every sequence its own adapter, fastlora against peft and the alternatives.

Run: ``python benchmarks/bench_mixed.py [--device cpu|cuda] [--threads N] [--repeats R] [--smoke]``. Shapes
768->2304 and 1024->4096, rank 16, k adapters in (1, 4, 16, 64), each sequence with one adapter, adapters
round-robin over the sequences: prefill, 512 tokens on the CPU (16 sequences of 32, or 64 of 8 for 64 adapters)
and 8192 on a GPU (64 sequences of 128); decode, 1, 4 or 8 one-token sequences per adapter (at most 64). fp32 on
the CPU, bf16 on a GPU. Contenders:

- ``fastlora mixed``: :func:`fastlora.lora_linear_mixed` (validation, dispatch, the backend's fused kernels);
- ``backend mixed``: the backend's ``forward_mixed`` called directly (the kernels without the op's Python layer);
- ``peft mixed``: peft's ``lora.Linear`` holding the k adapters, called with ``adapter_names`` (one per sequence);
- ``separate ops``: one :func:`fastlora.lora_linear` per adapter on its sequences, written into one output;
- ``F.linear``: the base layer alone, the floor.

Each case runs the contenders side by side, R rounds (4R for decode); on a GPU a sample is the CUDA-event time of
10 calls in a row. Rows (benchmark ``mixed``): ``time`` us with its ratio to ``peft mixed``. The printed table
also gives fastlora's time over the same case with one adapter (measured in this process, not side by side).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import internals
import torch
from contenders import Spec, base_linear, f_linear, make_tensors, peft_linear
from measure import side_by_side
from runner import Run, arguments

import fastlora

SHAPES = [(768, 2304), (1024, 4096)]
ADAPTERS = (1, 4, 16, 64)
RANK, ALPHA = 16, 32
PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}
GPU_CALLS = 10  # calls per timed sample on a GPU


def cases(device: str, adapters: tuple[int, ...] = ADAPTERS,
          prefill_tokens: int | None = None) -> list[tuple[str, int, int, int]]:
    """(kind, adapters, sequences, tokens per sequence), decode cases deduplicated after the 64-row cap."""
    out = []
    for k in adapters:
        seqs = max(16, k) if device == "cpu" else 64
        out.append(("prefill", k, seqs, (prefill_tokens or PREFILL_TOKENS[device]) // seqs))
        rows = []
        for per in (1, 4, 8):
            r = min(k * per, 64)
            if r not in rows:
                rows.append(r)
                out.append(("decode", k, r, 1))
    return out


def contenders(n_in: int, n_out: int, k: int, seqs: int, tokens: int, device: str) -> dict[str, Callable[[], object]]:
    """The contenders' calls on one batch, after checking that fastlora's results are peft's."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    t = make_tensors(Spec(seqs * tokens, n_in, n_out, RANK, 0.0, dtype, device, scale=ALPHA / RANK), backward=False)
    x, weight, bias = t.x.detach().view(seqs, tokens, n_in), t.weight, t.bias
    gen = torch.Generator().manual_seed(1)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device, getattr(torch, dtype))

    As = [rand(RANK, n_in, scale=n_in**-0.5) for _ in range(k)]
    Bs = [rand(n_out, RANK, scale=RANK**-0.5) for _ in range(k)]
    scales = [ALPHA / RANK] * k
    ids = torch.arange(seqs, device=device) % k
    names = [f"a{a}" for a in ids.tolist()]
    layer = peft_linear(base_linear(t), {f"a{a}": (As[a], Bs[a]) for a in range(k)}, ALPHA / RANK, 0.0).eval()
    flat_x, flat_ids = x.view(-1, n_in), ids.repeat_interleave(tokens)
    dropout_ps, seed = [0.0] * k, torch.zeros((), dtype=torch.int64)
    members = [torch.nonzero(ids == a).flatten() for a in range(k)]
    backend, base = internals.backend_for(x), f_linear(t).fn
    rows = internals.routing(flat_ids, k, flat_x)  # routed once, as use_adapters does per batch

    def separate():
        out = torch.empty(seqs, tokens, n_out, device=device, dtype=x.dtype)
        for a, rows in enumerate(members):
            out[rows] = fastlora.lora_linear(x[rows], weight, bias, As[a], Bs[a], scales[a])
        return out

    fns = {
        "F.linear": lambda: base(x),
        "fastlora mixed": lambda: fastlora.lora_linear_mixed(x, weight, bias, As, Bs, scales, ids),
        "backend mixed": lambda: backend.forward_mixed(flat_x, weight, bias, As, Bs, scales, dropout_ps, rows, seed),
        "peft mixed": lambda: layer(x, adapter_names=names),
        "separate ops": separate,
    }
    want = fns["peft mixed"]().float()
    for name in ("fastlora mixed", "separate ops"):
        got = fns[name]().float()
        err = ((got - want).norm() / want.norm()).item()
        assert err < (1e-5 if dtype == "float32" else 1e-2), f"{name} differs from peft: relative error {err:.1e}"
    return fns


def main(argv: list[str] | None = None) -> Run:
    argv = sys.argv[1:] if argv is None else argv
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=25, help="rounds per prefill case (decode: 4x)")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny layer, 1 and 4 adapters, 2 rounds")
    args = parser.parse_args(argv)
    shapes, adapters, prefill = SHAPES, ADAPTERS, None
    if args.smoke:
        shapes, adapters, prefill, args.repeats = [(64, 96)], (1, 4), 32, 2
    torch.set_num_threads(args.threads)
    run = Run("mixed", __file__, argv, args.csv)
    print(run.describe(args.device) + "\n")
    print("| shape | case | adapters | rows | F.linear us | fastlora us | backend us | peft us | separate us "
          "| fastlora/peft | fastlora/F.linear | fastlora/one adapter |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    one_adapter: dict[tuple, float] = {}
    with torch.no_grad():
        for n_in, n_out in shapes:
            for kind, k, seqs, tokens in cases(args.device, adapters, prefill):
                fns = contenders(n_in, n_out, k, seqs, tokens, args.device)
                samples = side_by_side(fns, args.repeats * (4 if kind == "decode" else 1), args.device,
                                       calls=1 if args.device == "cpu" else GPU_CALLS)
                case = f"{kind} {seqs}x{tokens}" if kind == "prefill" else kind
                params = {"in_features": n_in, "out_features": n_out, "kind": kind, "adapters": k, "sequences": seqs,
                          "tokens": tokens, "rank": RANK, "device": args.device}
                t = run.record_times(f"{n_in}->{n_out} {case} k={k}", params, samples, baseline="peft mixed",
                                     unit="us", device=args.device)
                key = (n_in, kind, seqs * tokens)
                if k == 1:
                    one_adapter[key] = t["fastlora mixed"]
                vs_one = f"{t['fastlora mixed'] / one_adapter[key]:.2f}" if key in one_adapter else "n/a"
                us = {name: v * 1e6 for name, v in t.items()}
                print(f"| {n_in}->{n_out} | {case} | {k} | {seqs * tokens} | {us['F.linear']:.0f} | "
                      f"{us['fastlora mixed']:.0f} | {us['backend mixed']:.0f} | {us['peft mixed']:.0f} | "
                      f"{us['separate ops']:.0f} | {t['fastlora mixed'] / t['peft mixed']:.2f} | "
                      f"{t['fastlora mixed'] / t['F.linear']:.2f} | {vs_one} |", flush=True)
    print(f"\n{len(run.rows)} rows appended to {args.csv}")
    return run


if __name__ == "__main__":
    main()
