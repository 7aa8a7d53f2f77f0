"""Where a LoRA layer call spends its time on a GPU: host (enqueue) time against GPU time, the device kernels
each call runs (counted with the torch profiler), and the host cost of one Triton launch.

    python benchmarks/host_profile.py [--tokens 16384] [--shape 1024x3072] [--rank 16] [--out DIR]

Contenders at bf16 with fp32 LoRA parameters (as peft keeps them), dropout 0.1: ``fastlora`` (the op, LoRA on
the whole output), ``fastlora q,v`` (slices, r=4), ``peft`` (peft's own lora.Linear, when peft is installed),
``unfused`` (peft's computation written out) and ``F.linear``. For each: median host microseconds per call
(the time the Python call takes to return, GPU not waited for), GPU microseconds per call (CUDA events over a
loop: the larger of the two when the host is the bottleneck), and device kernels per forward and per backward.
Prints a table; with ``--out`` writes ``host_profile.md`` there (with a profiler table and a Python profile of
fastlora's forward+backward). Needs CUDA.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fastlora


@triton.jit
def _noop_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def host_us(fn: Callable[[], object], iters: int = 50) -> float:
    """Median host microseconds for ``fn`` to return."""
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def gpu_us(fn: Callable[[], object], iters: int = 20, rounds: int = 5) -> float:
    """Median over rounds of the CUDA-event time per call of a loop of ``iters`` calls."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def kernels_per_call(fn: Callable[[], object], calls: int = 4) -> float:
    """Device kernels (and memsets/copies) per call, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(device_events) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shape", default="1024x3072")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    K, N = map(int, args.shape.split("x"))
    dev, dtype, p, scale = "cuda", torch.bfloat16, 0.1, 2.0
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.randn(args.tokens, K, device=dev, dtype=dtype, generator=gen).requires_grad_()
    W = (torch.randn(N, K, device=dev, generator=gen) / K**0.5).to(dtype)
    b = torch.randn(N, device=dev, dtype=dtype, generator=gen)
    dy = torch.randn(args.tokens, N, device=dev, dtype=dtype, generator=gen)

    def lora(rank, rows):
        A = (torch.randn(rank, K, device=dev, generator=gen) / K**0.5).requires_grad_()
        return A, (torch.randn(rows, rank // (2 if rows != N else 1), device=dev, generator=gen) * 0.1).requires_grad_()

    A, B = lora(args.rank, N)
    A_qv, B_qv = lora(8, 2 * N // 3)  # r=4 on q and v

    def unfused(inp):
        return F.linear(inp, W, b) + F.linear(F.linear(F.dropout(inp, p), A.to(dtype)), B.to(dtype)) * scale

    forwards = {
        "fastlora": lambda inp: fastlora.lora_linear(inp, W, b, A, B, scale, p),
        "fastlora q,v": lambda inp: fastlora.lora_linear(inp, W, b, A_qv, B_qv, scale, p, slices=[True, False, True]),
        "unfused": unfused,
        "F.linear": lambda inp: F.linear(inp, W, b),
    }
    try:
        from peft import LoraConfig, get_peft_model
        base = torch.nn.Sequential(torch.nn.Linear(K, N, device=dev, dtype=dtype))
        base[0].weight.data.copy_(W)
        base[0].bias.data.copy_(b)
        peft_model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=scale * args.rank, lora_dropout=p,
                                                     target_modules=["0"]))
        peft_model.train()
        forwards["peft"] = peft_model
    except Exception as error:
        print(f"peft unavailable: {error}")

    lines = [f"# Host time per call: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}",
             f"{args.tokens} tokens, {K}->{N}, r={args.rank} (q,v: r=4), bf16, fp32 LoRA parameters, dropout {p}",
             "", "| contender | mode | host us/call | GPU us/call | device kernels/call |", "|---|---|---:|---:|---:|"]
    for name, forward in forwards.items():
        cases = {"fwd no-grad": lambda f=forward: _no_grad(f, x),
                 "fwd": lambda f=forward: f(x),
                 "fwd+bwd": lambda f=forward: torch.autograd.backward(f(x), dy)}
        for mode, fn in cases.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            row = f"| {name} | {mode} | {host_us(fn):.1f} | {gpu_us(fn):.1f} | {kernels_per_call(fn):.1f} |"
            print(row, flush=True)
            lines.append(row)

    buf = torch.zeros(1024, device=dev)
    compiled = _noop_kernel[(1,)](buf, 1024, BLOCK=1024)
    jit = host_us(lambda: _noop_kernel[(1,)](buf, 1024, BLOCK=1024), 500)
    from triton.runtime import driver
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    direct = host_us(lambda: compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None,
                                          None, buf, 1024, 1024), 500)
    empty = host_us(lambda: torch.empty(16, device=dev), 500)
    zeros = host_us(lambda: torch.zeros(16, device=dev), 500)
    lines += ["", f"One launch of a trivial Triton kernel: {jit:.1f} us through the JIT, {direct:.1f} us calling the "
              f"compiled kernel; torch.empty {empty:.1f} us, torch.zeros {zeros:.1f} us (host)."]
    print(lines[-1])

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        torch.autograd.backward(forwards["fastlora"](x), dy)
    profiler.disable()
    torch.cuda.synchronize()
    stats = io.StringIO()
    pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(25)
    lines += ["", "## Python profile of 20 fastlora fwd+bwd calls (by own time)", "```", stats.getvalue(), "```"]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_profile.md").write_text("\n".join(lines) + "\n")


def _no_grad(forward, x):
    with torch.no_grad():
        return forward(x)


if __name__ == "__main__":
    main()
