"""Per-call cost where the compute is nothing: what a LoRA layer call costs beyond its kernels.

Run: ``python benchmarks/bench_overhead.py [--rounds R] [--quick] [--skip-decode]``. Two parts, each case's
contenders timed side by side in one process (interleaved rounds, the order rotating; :mod:`measure`), medians:

**Tiny** (fp32, x 8x64, W 64x64, r=8, one thread; on a GPU also in bf16 on the GPU): the no-grad forward
(dropout off, the LoRA layer in eval mode, as in inference) and forward + backward with dropout 0.1 (grads of x,
A and B; W and b frozen) of ``F.linear`` (the floor; its forward + backward computes dx), ``nn.Linear`` (the same
called as the module a LoRA layer replaces), ``unfused`` (the peft-style sum), ``peft`` (its ``lora.Linear``) and,
per backend available on the device, ``<backend> op`` (:func:`fastlora.lora_linear`), ``<backend> layer`` (a
:class:`fastlora.LoRALinear` called) and ``<backend> alone`` (the backend's own forward and backward, without the
op's Python layer or autograd). Each row also counts the aten ops one call runs (``TorchDispatchMode``; an op of
the C++ extension is not one) and, on a GPU, the device kernels it launches (``torch.profiler``).

**Decode** (fp32 CPU, the eval layer's no-grad forward, 1, 2, 4 and 8 rows, 768->2304 and 1024->4096, r=16, on 1
and 2 threads, ``--decode-threads``): ``F.linear``, the cpu backend's op, layer and backend alone.

On one CPU thread the clock is the thread's CPU time (other processes' load does not count), else wall time.
Prints markdown tables with each contender's ratios to ``F.linear``, ``nn.Linear`` and ``unfused`` of the same
case; rows (benchmark ``overhead``): ``time`` us with its ratio to ``F.linear``, ``aten ops``, ``kernels``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import internals
import torch
from contenders import Built, Spec, forced_backend, make_tensors, pick
from measure import aten_ops_per_call, kernels_per_call, median, side_by_side, spread
from runner import Run, arguments, device_name, load_average

import fastlora

TINY = (8, 64, 64, 8)  # rows, in, out, rank
DECODE_SHAPES = ((768, 2304), (1024, 4096))
DECODE_ROWS = (1, 2, 4, 8)
DECODE_RANK = 16
DROPOUT, SCALE = 0.1, 2.0
MODES = ("forward", "forward+backward")
OTHERS = ("F.linear", "nn.Linear", "unfused", "peft")
Fn = tuple[str | None, Callable[[], object]]  # (the backend to force, one call)


def contenders(spec: Spec, mode: str, backends: list[str], others: tuple[str, ...] = OTHERS) -> dict[str, Fn]:
    """name -> (the backend to force, one call of the contender on the spec's x) for ``mode``: ``others`` and,
    per backend, its op, layer and backend alone."""
    train = mode == "forward+backward"
    t = make_tensors(spec, train)
    x, dy = t.x, t.grads[0] if train else None
    names = [*others, *(f"{b} {kind}" for b in backends for kind in ("op", "layer"))]
    pool, _ = pick(spec, names)
    fns: dict[str, Fn] = {}

    def add(name: str, forced: str | None, built: Built) -> None:
        fn, grads = built.fn, (x, *built.grads)
        if train:
            def backward(y: torch.Tensor) -> None:
                for tensor in grads:
                    tensor.grad = None
                y.backward(dy)
            fns[name] = (forced, lambda: backward(fn(x)))
        else:
            def no_grad() -> object:
                with torch.no_grad():
                    return fn(x)
            fns[name] = (forced, no_grad)

    for contender in pool:
        with contender.active():
            built = contender.build(t)
        if built.module is not None:
            built.module.train(train)  # the no-grad forward runs as in inference
        add(contender.name, contender.backend, built)
        if contender.name.endswith(" layer"):
            fns[f"{contender.backend} alone"] = (contender.backend, _alone(contender.backend, t, train))
    return fns


def _alone(name: str, t, train: bool) -> Callable[[], object]:
    """The backend's own forward (and backward) on the case's tensors, without the op's Python layer."""
    module = internals.backend(name)
    x, w, b, A, B, s = t.x.detach(), t.weight, t.bias, t.lora_A.detach(), t.lora_B.detach(), t.spec.scale
    seed, needs = torch.zeros((), dtype=torch.int64), (True, True, True)
    if not train:
        return lambda: module.forward(x, w, b, A, B, s, 0.0, seed, None, None)
    dy, p = t.grads[0], t.spec.dropout

    def forward_backward() -> object:
        y = module.forward(x, w, b, A, B, s, p, seed, None, None)
        module.backward(dy, x, w, A, B, s, p, seed, needs)
        return y
    return forward_backward


def clock(device: str) -> Callable[[], float]:
    """Thread CPU time on one CPU thread (the calls run on the calling thread, and other processes' load does
    not count), else wall time."""
    return time.thread_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def measure(fns: dict[str, Fn], device: str, rounds: int, min_sample_s: float) -> dict[str, dict]:
    """Median, spread, aten ops and device kernels of each contender, timed side by side."""
    calls = {name: fn for name, (_, fn) in fns.items()}
    contexts = {name: (lambda forced=forced: forced_backend(forced)) for name, (forced, _) in fns.items()}
    samples = side_by_side(calls, rounds, device, min_sample_s=min_sample_s, warmup=3, most=100_000,
                           clock=clock(device), contexts=contexts)
    rows = {}
    for name, (forced, fn) in fns.items():
        with forced_backend(forced):
            rows[name] = {"aten ops": aten_ops_per_call(fn),
                          "kernels": kernels_per_call(fn) if device == "cuda" else None}
        rows[name].update(us=median(samples[name]) * 1e6, spread=spread(samples[name]), samples=samples[name])
    return rows


def record(run: Run, case: str, params: dict, rows: dict[str, dict], device: str) -> None:
    run.record_times(case, params, {name: r["samples"] for name, r in rows.items()}, baseline="F.linear",
                     unit="us", device=device)
    run.record_group(case, params, "aten ops", "", {name: r["aten ops"] for name, r in rows.items()},
                     device=device)
    if device == "cuda":
        run.record_group(case, params, "kernels", "", {name: r["kernels"] for name, r in rows.items()},
                         device=device)


# ---------------------------------------------------------------- tables


def _ratio(rows: dict[str, dict], name: str, base: str) -> str:
    return f"{rows[name]['us'] / rows[base]['us']:.2f}" if base in rows else "n/a"


def table(title: str, rows: dict[str, dict], bases: tuple[str, ...]) -> list[str]:
    head = ["contender", "µs per call", "spread", *(f"÷ {b}" for b in bases), "aten ops", "GPU kernels"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        kernels = "n/a" if r["kernels"] is None else f"{r['kernels']:g}"
        lines.append(f"| {name} | {r['us']:.1f} | ±{r['spread']:.0%} | "
                     + " | ".join(_ratio(rows, name, b) for b in bases) + f" | {r['aten ops']} | {kernels} |")
    return lines + [""]


def _load() -> str:
    load = load_average()
    return "n/a" if load is None else f"{load:.2f}"


# ---------------------------------------------------------------- the two parts


def tiny_cases(run: Run, device: str, rounds: int, min_sample_s: float) -> None:
    rows_, n_in, n_out, rank = TINY
    available = [n for n, s in fastlora.backends().items() if s.available]
    runs = [("cpu", "float32", [n for n in available if n != "triton"])]
    if device == "cuda":
        runs.append(("cuda", "bfloat16", [n for n in available if n in ("triton", "reference")]))
    for dev, dtype, backends in runs:
        for mode in MODES:
            spec = Spec(rows_, n_in, n_out, rank, DROPOUT if mode == "forward+backward" else 0.0, dtype, dev,
                        scale=SCALE)
            rows = measure(contenders(spec, mode, backends), dev, rounds, min_sample_s)
            title = (f"Tiny, {mode}{' (dropout 0.1)' if spec.dropout else ''}: {dev} {dtype}, "
                     f"x {rows_}x{n_in}, W {n_out}x{n_in}, r={rank}, {torch.get_num_threads()} thread(s)")
            record(run, f"tiny {mode} {spec.label}", {**spec.params(), "mode": mode}, rows, dev)
            print("\n".join(table(title, rows, ("F.linear", "nn.Linear", "unfused"))), flush=True)


def decode_cases(run: Run, threads: list[int], rows_list: tuple[int, ...], rounds: int, min_sample_s: float) -> None:
    if not fastlora.backends()["cpu"].available:
        print(f"Decode: skipped, the cpu backend is unavailable ({fastlora.backends()['cpu'].reason})\n")
        return
    before = torch.get_num_threads()
    head = ["shape", "rows", "threads", "F.linear µs", "op µs", "layer µs", "alone µs", "op ÷ F.linear",
            "layer ÷ F.linear", "alone ÷ F.linear", "spread (op)"]
    print("\n".join(["**Decode: the eval layer's no-grad forward, fp32, cpu backend, r=16**", "",
                     "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]), flush=True)
    try:
        for n in threads:
            torch.set_num_threads(n)
            for n_in, n_out in DECODE_SHAPES:
                for m in rows_list:
                    spec = Spec(m, n_in, n_out, DECODE_RANK, 0.0, scale=SCALE)
                    fns = contenders(spec, "forward", ["cpu"], others=("F.linear",))
                    r = measure(fns, "cpu", rounds, min_sample_s)
                    record(run, f"decode {spec.label}", {**spec.params(), "mode": "forward"}, r, "cpu")
                    f = r["F.linear"]["us"]
                    print(f"| {n_in}->{n_out} | {m} | {n} | {f:.1f} | {r['cpu op']['us']:.1f} | "
                          f"{r['cpu layer']['us']:.1f} | {r['cpu alone']['us']:.1f} | "
                          f"{r['cpu op']['us'] / f:.3f} | {r['cpu layer']['us'] / f:.3f} | "
                          f"{r['cpu alone']['us'] / f:.3f} | ±{r['cpu op']['spread']:.0%} |", flush=True)
    finally:
        torch.set_num_threads(before)
    print()


def main(argv: list[str] | None = None) -> Run:
    argv = sys.argv[1:] if argv is None else argv
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per case")
    parser.add_argument("--min-sample-ms", type=float, default=5.0, help="each sample's length (calls repeat)")
    parser.add_argument("--quick", action="store_true", help="7 rounds, 1 and 8 decode rows, 2 ms samples")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--decode-threads", default="1,2",
                        help="comma-separated thread counts for decode (on a loaded machine, 2 threads time waits)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.min_sample_ms = 7, 2.0
    rows_list = (1, 8) if args.quick else DECODE_ROWS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = Run("overhead", __file__, argv, args.csv)
    isa = f", {internals.cpu_kernels()}" if fastlora.backends()["cpu"].available else ""
    gpu = f" + {device_name('cuda')}" if device == "cuda" else ""
    print("\n".join([f"# Per-call overhead, {run.meta['date']}, commit {run.meta['commit']}", "",
                     f"`{run.meta['command']}`", "",
                     f"{device_name('cpu')}{gpu}; torch {torch.__version__}{isa}; load average before: {_load()}", "",
                     f"Medians of {args.rounds} interleaved rounds; spread = half the interquartile range over the "
                     "median. On one CPU thread the clock is the thread's CPU time (other processes' load does not "
                     "count), else wall time.", ""]), flush=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_cases(run, device, args.rounds, args.min_sample_ms / 1e3)
    finally:
        torch.set_num_threads(before)
    if not args.skip_decode:
        threads = [int(n) for n in args.decode_threads.split(",")]
        decode_cases(run, threads, rows_list, args.rounds, args.min_sample_ms / 1e3)
    print(f"Load average after: {_load()}\n\n{len(run.rows)} rows appended to {args.csv}")
    return run


if __name__ == "__main__":
    main()
