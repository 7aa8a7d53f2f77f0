"""Micro-benchmark of the cpu backend against F.linear and the unfused LoRA, ratios in one process.

Run: ``python benchmarks/cpu_kernels.py [--quick]``. For each case it times, interleaved and
repeated, the fused op (``lora_linear`` with ``FASTLORA_BACKEND=cpu``), the backend functions
called directly with each GEMM for the base product (``k:torch``, ``k:openblas``: the
extension without the op's dispatch and autograd layers),
``plain`` (``F.linear(x, W, b)``), ``unfused`` (``F.linear(x, W, b) +
F.linear(F.linear(dropout(x), A), B) * s``) and, for forward, ``numpy`` (``x @ W.T`` in numpy:
numpy's own OpenBLAS on its own threads, a yardstick for the base product without PyTorch's
MKL). It prints medians as GFLOP/s of the base product (2·M·in·out per forward, twice that
with backward) next to the time ratios.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

os.environ["FASTLORA_BACKEND"] = "cpu"
import fastlora
from fastlora.ops import cpu

GPT2_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]


def unfused(x, weight, bias, lora_A, lora_B, scale, p):
    x_lora = F.dropout(x, p, training=True) if p > 0 else x
    return F.linear(x, weight, bias) + F.linear(F.linear(x_lora, lora_A), lora_B) * scale


def make_case(n_in: int, n_out: int, m: int, rank: int, layout: str, backward: bool):
    torch.manual_seed(0)
    x = torch.randn(m, n_in).requires_grad_(backward)
    weight = torch.randn(n_out, n_in) * n_in**-0.5
    if layout == "conv1d":  # a Conv1D (in, out) buffer seen as (out, in)
        weight = weight.t().contiguous().t()
    bias = torch.randn(n_out) * 0.1
    lora_A = (torch.randn(rank, n_in) * n_in**-0.5).requires_grad_(backward)
    lora_B = (torch.randn(n_out, rank) * rank**-0.5).requires_grad_(backward)
    grad = torch.randn(m, n_out)
    return x, weight, bias, lora_A, lora_B, grad


def contenders(case, p: float, backward: bool, with_numpy: bool) -> dict[str, Callable[[], None]]:
    x, weight, bias, lora_A, lora_B, grad = case
    fns = {
        "fused": lambda: fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, p),
        "plain": lambda: F.linear(x, weight, bias),
        "unfused": lambda: unfused(x, weight, bias, lora_A, lora_B, 2.0, p),
    }

    def run_backward(fn):
        def step():
            for t in (x, lora_A, lora_B):
                t.grad = None
            fn().backward(grad)
        return step

    def run_forward(fn):
        def step():
            with torch.no_grad():
                fn()
        return step

    wrap = run_backward if backward else run_forward
    default_gemm = cpu.gemm()

    def with_default_gemm(step):
        def call():
            cpu.set_gemm(default_gemm)
            step()
        return call
    timed = {name: with_default_gemm(wrap(fn)) for name, fn in fns.items()}
    for name in cpu.GEMMS:
        timed[f"k:{name}"] = backend_call(case, p, backward, name)
    if with_numpy and not backward:
        x_np, w_np = x.numpy(), weight.numpy()
        timed["numpy"] = lambda: np.matmul(x_np, w_np.T)
    return timed


def backend_call(case, p: float, backward: bool, gemm: str) -> Callable[[], None]:
    """The cpu backend's forward (and backward) called directly, with the given GEMM."""
    x, weight, bias, lora_A, lora_B, grad = (t.detach() for t in case)
    seed = torch.tensor(1234)

    def call():
        cpu.set_gemm(gemm)
        cpu.forward(x, weight, bias, lora_A, lora_B, 2.0, p, seed)
        if backward:
            cpu.backward(grad, x, weight, lora_A, lora_B, 2.0, p, seed, (True, True, True))
    return call


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int, budget_s: float,
                     clock: Callable[[], float]) -> dict[str, float]:
    """Median seconds per call of each contender, the contenders taking turns each repeat."""
    for fn in fns.values():  # warm-up, and size the batch of calls per timing
        fn()
    start = clock()
    next(iter(fns.values()))()
    once = max(clock() - start, 1e-6)
    calls = max(1, min(200, int(budget_s / repeats / len(fns) / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            begin = clock()
            for _ in range(calls):
                fn()
            samples[name].append((clock() - begin) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short subset (a few minutes at the default budget)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128, 512, 2048])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--layouts", nargs="+", default=["linear", "conv1d"], choices=["linear", "conv1d"])
    parser.add_argument("--modes", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads (one thread is steadier on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # On one thread all contenders but numpy run on the calling thread: its CPU time is immune
    # to other processes competing for the cores, where wall time is not.
    single = args.threads == 1
    clock = time.thread_time if single else time.perf_counter
    if args.quick:
        args.tokens, args.ranks, args.layouts = [1, 8, 128, 512], [4], ["linear"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, kernels {cpu.isa()}, "
          f"OpenBLAS core {cpu._C.blas_core()}, clock {'thread CPU time' if single else 'wall'}")
    print(f"defaults: GEMM {cpu.gemm()}")
    print(f"{'mode':8} {'layout':6} {'in':>5} {'out':>5} {'M':>5} {'r':>3} {'p':>4} | GFLOP/s "
          f"{'fused':>7} {'k:torch':>7} {'k:oblas':>7} {'plain':>7} {'unfused':>7} {'numpy':>7} | "
          f"fused/plain k:torch/plain k:oblas/plain unfused/fused")
    grid = itertools.product(args.modes, args.layouts, GPT2_SHAPES, args.tokens, args.ranks, args.dropouts)
    for mode, layout, (n_in, n_out), m, rank, p in grid:
        backward = mode == "backward"
        if not backward and p > 0 and m > 8:
            continue  # forward timings with dropout add nothing over backward's
        case = make_case(n_in, n_out, m, rank, layout, backward)
        t = time_interleaved(contenders(case, p, backward, not single), args.repeats, args.budget, clock)
        flop = 2 * m * n_in * n_out * (2 if backward else 1)
        gflops = {name: flop / s / 1e9 for name, s in t.items()}
        print(f"{mode:8} {layout:6} {n_in:5} {n_out:5} {m:5} {rank:3} {p:4.2f} |         "
              f"{gflops['fused']:7.1f} {gflops['k:torch']:7.1f} {gflops['k:openblas']:7.1f} {gflops['plain']:7.1f} "
              f"{gflops['unfused']:7.1f} {gflops.get('numpy', float('nan')):7.1f} | {t['fused'] / t['plain']:11.3f} "
              f"{t['k:torch'] / t['plain']:13.3f} {t['k:openblas'] / t['plain']:13.3f} "
              f"{t['unfused'] / t['fused']:13.3f}", flush=True)


if __name__ == "__main__":
    main()
