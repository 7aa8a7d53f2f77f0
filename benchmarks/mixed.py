"""Mixed batches (forward, as in serving): ``fastlora.lora_linear_mixed`` against peft's mixed-batch path, one
``fastlora.lora_linear`` call per adapter, and plain ``F.linear``, in one process, on the CPU (fp32) or a GPU (bf16).

Run: ``python benchmarks/mixed.py [--device cpu|cuda] [--threads N] [--repeats R]``. Shapes 768->2304 and
1024->4096, rank 16, k adapters in (1, 4, 16, 64), each sequence with one adapter, adapters round-robin over the
sequences: prefill, 512 tokens on the CPU (16 sequences of 32, or 64 of 8 for 64 adapters) and 8192 on a GPU
(64 sequences of 128); decode, 1, 4 or 8 one-token sequences per adapter (at most 64). Contenders:

- ``fastlora``: ``lora_linear_mixed`` (validation, dispatch, the backend's fused kernels);
- ``backend``: the backend's ``forward_mixed`` called directly (the kernels without the op's Python layer);
- ``peft``: a peft LoRA ``Linear`` with k adapters called with ``adapter_names`` (one per sequence);
- ``separate``: one ``lora_linear`` per adapter on its sequences, written into one output;
- ``F.linear``: the base layer alone, the floor.

Each case runs the contenders interleaved (the order rotating), R rounds (4R for decode), and reports medians
in microseconds (on a GPU: CUDA-event time of 10 calls in a row, per call) with the ratios fastlora/peft,
fastlora/F.linear and fastlora/one adapter (the same case with k = 1).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from collections import OrderedDict

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from timing import median_times
from torch import nn

import fastlora
from fastlora.ops.dispatch import select

SHAPES = [(768, 2304), (1024, 4096)]
ADAPTERS = (1, 4, 16, 64)
RANK, ALPHA = 16, 32
PREFILL_TOKENS = {"cpu": 512, "cuda": 8192}
GPU_CALLS = 10  # calls per timed sample on a GPU


def cases(device: str) -> list[tuple[str, int, int, int]]:
    """(kind, adapters, sequences, tokens per sequence), decode cases deduplicated after the 64-row cap."""
    out = []
    for k in ADAPTERS:
        seqs = max(16, k) if device == "cpu" else 64
        out.append(("prefill", k, seqs, PREFILL_TOKENS[device] // seqs))
        rows = []
        for per in (1, 4, 8):
            r = min(k * per, 64)
            if r not in rows:
                rows.append(r)
                out.append(("decode", k, r, 1))
    return out


def peft_layer(weight, bias, As, Bs):
    """A peft LoRA Linear over (weight, bias) holding adapters a0..a{k-1} with these A and B."""
    base = nn.Sequential(OrderedDict(lin=nn.Linear(weight.shape[1], weight.shape[0])))
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin"], lora_dropout=0.0)
    model = get_peft_model(base, config, adapter_name="a0")
    for a in range(1, len(As)):
        model.add_adapter(f"a{a}", config)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.base_layer.bias.copy_(bias)
        for a, (A, B) in enumerate(zip(As, Bs, strict=True)):
            layer.lora_A[f"a{a}"].weight.copy_(A)
            layer.lora_B[f"a{a}"].weight.copy_(B)
    return layer.eval()


def contenders(n_in: int, n_out: int, k: int, seqs: int, tokens: int, device: str) -> dict:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    x = rand(seqs, tokens, n_in)
    weight, bias = rand(n_out, n_in, scale=n_in**-0.5), rand(n_out, scale=0.1)
    As = [rand(RANK, n_in, scale=n_in**-0.5) for _ in range(k)]
    Bs = [rand(n_out, RANK, scale=RANK**-0.5) for _ in range(k)]
    scales = [ALPHA / RANK] * k
    ids = torch.arange(seqs, device=device) % k
    names = [f"a{a}" for a in ids.tolist()]
    layer = peft_layer(weight, bias, As, Bs).to(device, dtype)
    flat_x, flat_ids = x.view(-1, n_in), ids.repeat_interleave(tokens)
    dropout_ps, seed = [0.0] * k, torch.zeros((), dtype=torch.int64)
    members = [torch.nonzero(ids == a).flatten() for a in range(k)]
    backend = select(x)

    def separate():
        out = torch.empty(seqs, tokens, n_out, device=device, dtype=dtype)
        for a, rows in enumerate(members):
            out[rows] = fastlora.lora_linear(x[rows], weight, bias, As[a], Bs[a], scales[a])
        return out

    fns = {
        "F.linear": lambda: F.linear(x, weight, bias),
        "fastlora": lambda: fastlora.lora_linear_mixed(x, weight, bias, As, Bs, scales, ids),
        "backend": lambda: backend.forward_mixed(flat_x, weight, bias, As, Bs, scales, dropout_ps, flat_ids, seed),
        "peft": lambda: layer(x, adapter_names=names),
        "separate": separate,
    }
    want = fns["peft"]().float()
    for name in ("fastlora", "separate"):
        got = fns[name]().float()
        err = ((got - want).norm() / want.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), f"{name} differs from peft: relative error {err:.1e}"
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=25, help="rounds per prefill case (decode: 4x)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    where = (f"{args.threads} thread(s), {platform.processor() or platform.machine()}" if args.device == "cpu"
             else torch.cuda.get_device_name())
    print(f"torch {torch.__version__}, {where}, backend {select(torch.empty(0, device=args.device)).__name__}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {datetime.date.today()}\n")
    print("| shape | case | adapters | rows | F.linear us | fastlora us | backend us | peft us | separate us "
          "| fastlora/peft | fastlora/F.linear | fastlora/one adapter |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    one_adapter: dict[tuple, float] = {}
    with torch.no_grad():
        for n_in, n_out in SHAPES:
            for kind, k, seqs, tokens in cases(args.device):
                fns = contenders(n_in, n_out, k, seqs, tokens, args.device)
                t = median_times(fns, args.repeats * (4 if kind == "decode" else 1),
                                 calls=1 if args.device == "cpu" else GPU_CALLS, device=args.device)
                key = (n_in, kind, seqs * tokens)
                if k == 1:
                    one_adapter[key] = t["fastlora"]
                vs_one = f"{t['fastlora'] / one_adapter[key]:.2f}" if key in one_adapter else "n/a"
                us = {name: v * 1e6 for name, v in t.items()}
                case = f"{kind} {seqs}x{tokens}" if kind == "prefill" else kind
                print(f"| {n_in}->{n_out} | {case} | {k} | {seqs * tokens} | {us['F.linear']:.0f} | "
                      f"{us['fastlora']:.0f} | {us['backend']:.0f} | {us['peft']:.0f} | {us['separate']:.0f} | "
                      f"{t['fastlora'] / t['peft']:.2f} | {t['fastlora'] / t['F.linear']:.2f} | {vs_one} |", flush=True)
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
