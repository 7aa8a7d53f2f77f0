"""Where a LoRA layer call spends its time on a GPU: host (enqueue) time against GPU time, the device kernels each
call runs, and the host cost of one Triton launch.

    python benchmarks/bench_host_profile.py [--tokens 16384] [--shape 1024x3072] [--rank 16]

Contenders at bf16 with fp32 LoRA parameters (as peft keeps them), dropout 0.1: ``triton op`` (LoRA on the whole
output, and on q and v only with slices at r=4), ``peft`` (its ``lora.Linear``), ``unfused`` (peft's computation
written out) and ``F.linear``; each a no-grad forward, a forward, and a forward + backward. Rows (benchmark
``host_profile``): ``host time`` us (median time for the Python call to return, the GPU not waited for),
``time`` us (CUDA events over loops of 20 calls, side by side, with its ratio to ``F.linear``: the larger of the
two when the host is the bottleneck), ``kernels`` per call (torch profiler); the host time of a trivial Triton
kernel's launch through the JIT and called compiled, and of ``torch.empty`` and ``torch.zeros``. Then a Python
profile of the op's forward + backward. Needs CUDA.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import torch
import triton
import triton.language as tl
from contenders import Spec, make_tensors, pick
from measure import host_time, kernels_per_call, side_by_side
from runner import Run, arguments, table

QV = (True, False, True)
MODES = ("fwd no-grad", "fwd", "fwd+bwd")


@triton.jit
def _noop_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def calls(spec: Spec, names: tuple[str, ...], suffix: str = "") -> dict[str, dict[str, Callable[[], object]]]:
    """For each mode, each contender's call on the spec's tensors."""
    t = make_tensors(spec)
    x, dy = t.x, t.grads[0]
    by_mode: dict[str, dict] = {mode: {} for mode in MODES}
    for contender in pick(spec, names)[0]:
        with contender.active():
            fn = contender.build(t).fn
        name = contender.name + suffix
        by_mode["fwd no-grad"][name] = lambda fn=fn: _no_grad(fn, x)
        by_mode["fwd"][name] = lambda fn=fn: fn(x)
        by_mode["fwd+bwd"][name] = lambda fn=fn: torch.autograd.backward(fn(x), dy)
    return by_mode


def _no_grad(fn: Callable, x: torch.Tensor) -> object:
    with torch.no_grad():
        return fn(x)


def launch_costs(run: Run) -> None:
    """Host time of one launch of a trivial Triton kernel, through the JIT and called compiled, and of two aten
    allocations."""
    buf = torch.zeros(1024, device="cuda")
    compiled = _noop_kernel[(1,)](buf, 1024, BLOCK=1024)
    from triton.runtime import driver

    stream = driver.active.get_current_stream(driver.active.get_current_device())
    fns = {"triton JIT launch": lambda: _noop_kernel[(1,)](buf, 1024, BLOCK=1024),
           "compiled kernel launch": lambda: compiled.run(1, 1, 1, stream, compiled.function,
                                                          compiled.packed_metadata, None, None, None, buf, 1024, 1024),
           "torch.empty": lambda: torch.empty(16, device="cuda"),
           "torch.zeros": lambda: torch.zeros(16, device="cuda")}
    times = {name: host_time(fn, 500) * 1e6 for name, fn in fns.items()}
    run.record_group("trivial kernel launch", {}, "host time", "us", times, device="cuda")


def main(argv: list[str] | None = None) -> Run:
    argv = sys.argv[1:] if argv is None else argv
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shape", default="1024x3072")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_host_profile.py needs CUDA")
    n_in, n_out = map(int, args.shape.split("x"))
    common = {"dropout": 0.1, "dtype": "bfloat16", "device": "cuda", "lora_dtype": "float32", "scale": 2.0}
    whole = Spec(args.tokens, n_in, n_out, args.rank, **common)
    qv = Spec(args.tokens, n_in, n_out, 4, slices=QV, **common)
    run = Run("host_profile", __file__, argv, args.csv)
    print(run.describe("cuda"), flush=True)
    by_mode = calls(whole, ("triton op", "peft", "unfused", "F.linear"))
    for mode, fns in calls(qv, ("triton op",), " q,v").items():
        by_mode[mode].update(fns)
    for mode, fns in by_mode.items():
        case, params = f"{whole.label} {mode} (q,v: r=4)", {**whole.params(), "mode": mode, "qv_rank": 4}
        first = len(run.rows)
        samples = side_by_side(fns, 5, "cuda", calls=20, warmup=3)
        run.record_times(case, params, samples, baseline="F.linear", unit="us", device="cuda")
        run.record_group(case, params, "host time", "us", {n: host_time(f) * 1e6 for n, f in fns.items()},
                         device="cuda")
        run.record_group(case, params, "kernels", "", {n: kernels_per_call(f, 4) for n, f in fns.items()},
                         device="cuda")
        print(table(run.rows[first:]), flush=True)
    launch_costs(run)
    print(table(run.rows[-4:]), flush=True)

    profiler = cProfile.Profile()
    fwd_bwd = by_mode["fwd+bwd"]["triton op"]
    profiler.enable()
    for _ in range(20):
        fwd_bwd()
    profiler.disable()
    torch.cuda.synchronize()
    stats = io.StringIO()
    pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(25)
    print("Python profile of 20 forward + backward calls of the op (by own time)\n" + stats.getvalue())
    print(f"{len(run.rows)} rows appended to {args.csv}")
    return run


if __name__ == "__main__":
    main()
