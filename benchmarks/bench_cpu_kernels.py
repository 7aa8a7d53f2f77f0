"""The cpu backend against F.linear and the unfused LoRA, with each of its GEMMs for the base product.

Run: ``python benchmarks/bench_cpu_kernels.py [--quick | --smoke] [--threads N]``. For each case it times side by
side the op (``cpu op``: :func:`fastlora.lora_linear` on the cpu backend), the backend's functions called directly
with each GEMM for the base product (``cpu alone, <gemm>``: the extension without the op's dispatch and autograd),
``F.linear`` and ``unfused`` and, for forward, ``numpy`` (``x @ W.T`` in numpy: numpy's own OpenBLAS on its own
threads, a yardstick for the base product without PyTorch's MKL). Prints GFLOP/s of the base product
(2·M·in·out per forward, twice that with backward) next to the time ratios; rows (benchmark ``cpu_kernels``):
``time`` us with its ratio to ``F.linear``. On one thread the clock is the thread's CPU time (every contender
but numpy runs on the calling thread), which other processes' load does not inflate.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import internals
import numpy as np
import torch
from contenders import BY_NAME, Contender, Spec, Tensors, make_tensors
from measure import side_by_side
from runner import Run, arguments

GPT2_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
CONTENDERS = ("cpu op", "F.linear", "unfused")


@contextlib.contextmanager
def gemm(name: str) -> Iterator[None]:
    """The cpu backend's base-product GEMM set to ``name`` inside the block."""
    previous = internals.cpu_gemm()
    internals.set_cpu_gemm(name)
    try:
        yield
    finally:
        internals.set_cpu_gemm(previous)


def contenders(t: Tensors, backward: bool, with_numpy: bool) -> tuple[dict[str, Callable[[], object]], dict]:
    """Each contender's call and the context it runs in (the cpu backend forced, its GEMM chosen)."""
    x, dy = t.x, t.grads[0] if backward else None
    fns, contexts = {}, {}
    default = internals.cpu_gemm()
    for name in CONTENDERS:
        contender = BY_NAME[name]
        built = contender.build(t)
        fn, grads = built.fn, (x, *built.grads)
        if backward:
            def call(fn=fn, grads=grads) -> None:
                for tensor in grads:
                    tensor.grad = None
                fn(x).backward(dy)
        else:
            def call(fn=fn) -> None:
                with torch.no_grad():
                    fn(x)
        fns[name] = call
        contexts[name] = lambda contender=contender: _forced(contender, default)
    for name in internals.cpu_gemms():
        fns[f"cpu alone, {name}"] = _backend_call(t, backward)
        contexts[f"cpu alone, {name}"] = lambda name=name: gemm(name)
    if with_numpy and not backward:
        x_np, w_np = x.detach().numpy(), t.weight.numpy()
        fns["numpy"] = lambda: np.matmul(x_np, w_np.T)
    return fns, contexts


@contextlib.contextmanager
def _forced(contender: Contender, default_gemm: str) -> Iterator[None]:
    """The contender's backend forced, and the cpu backend's default GEMM (the others switch it)."""
    with contender.active(), gemm(default_gemm):
        yield


def _backend_call(t: Tensors, backward: bool) -> Callable[[], None]:
    """The cpu backend's forward (and backward) called directly."""
    cpu = internals.backend("cpu")
    x, w, b, A, B = (v.detach() for v in (t.x, t.weight, t.bias, t.lora_A, t.lora_B))
    dy, s, p, seed = t.grads[0] if backward else None, t.spec.scale, t.spec.dropout, torch.tensor(1234)

    def call() -> None:
        cpu.forward(x, w, b, A, B, s, p, seed, None, None)
        if backward:
            cpu.backward(dy, x, w, A, B, s, p, seed, (True, True, True))
    return call


def main(argv: list[str] | None = None) -> Run:
    argv = sys.argv[1:] if argv is None else argv
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short subset (a few minutes at the default budget)")
    parser.add_argument("--smoke", action="store_true", help="seconds: one small shape, two cases")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128, 512, 2048])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--layouts", nargs="+", default=["linear", "conv1d"], choices=["linear", "conv1d"])
    parser.add_argument("--modes", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads (one thread is steadier on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = GPT2_SHAPES
    if args.quick:
        args.tokens, args.ranks, args.layouts = [1, 8, 128, 512], [4], ["linear"]
    if args.smoke:
        shapes, args.tokens, args.ranks, args.dropouts, args.layouts = [(64, 96)], [8], [4], [0.1], ["linear"]
        args.repeats, args.budget = 2, 0.05
    single = args.threads == 1
    clock = time.thread_time if single else time.perf_counter
    run = Run("cpu_kernels", __file__, argv, args.csv)
    print(run.describe("cpu"))
    print(f"{internals.cpu_kernels()}, OpenBLAS core {internals.openblas_core()}, "
          f"clock {'thread CPU time' if single else 'wall'}")
    print(f"{'mode':8} {'layout':6} {'in':>5} {'out':>5} {'M':>5} {'r':>3} {'p':>4} | GFLOP/s "
          f"{'op':>7} {'k:torch':>7} {'k:oblas':>7} {'F.lin':>7} {'unfused':>7} {'numpy':>7} | "
          f"op/F.linear k:torch/F.linear k:oblas/F.linear unfused/op")
    grid = itertools.product(args.modes, args.layouts, shapes, args.tokens, args.ranks, args.dropouts)
    for mode, layout, (n_in, n_out), m, rank, p in grid:
        backward = mode == "backward"
        if not backward and p > 0 and m > 8:
            continue  # forward timings with dropout add nothing over backward's
        spec = Spec(m, n_in, n_out, rank, p, conv1d=layout == "conv1d")
        t = make_tensors(spec, backward)
        fns, contexts = contenders(t, backward, not single)
        samples = side_by_side(fns, args.repeats, min_sample_s=args.budget / args.repeats / len(fns), most=200,
                               clock=clock, contexts=contexts)
        s = run.record_times(f"{spec.label} {mode}", {**spec.params(), "mode": mode}, samples, baseline="F.linear",
                             unit="us")
        flop = 2 * m * n_in * n_out * (2 if backward else 1)
        gflops = {name: flop / seconds / 1e9 for name, seconds in s.items()}
        print(f"{mode:8} {layout:6} {n_in:5} {n_out:5} {m:5} {rank:3} {p:4.2f} |         "
              f"{gflops['cpu op']:7.1f} {gflops['cpu alone, torch']:7.1f} {gflops['cpu alone, openblas']:7.1f} "
              f"{gflops['F.linear']:7.1f} {gflops['unfused']:7.1f} {gflops.get('numpy', float('nan')):7.1f} | "
              f"{s['cpu op'] / s['F.linear']:11.3f} {s['cpu alone, torch'] / s['F.linear']:13.3f} "
              f"{s['cpu alone, openblas'] / s['F.linear']:13.3f} {s['unfused'] / s['cpu op']:13.3f}", flush=True)
    print(f"{len(run.rows)} rows appended to {args.csv}")
    return run


if __name__ == "__main__":
    main()
