"""Per-call cost where the compute is nothing: what a LoRA layer call costs beyond its kernels.

Run: ``python benchmarks/overhead.py [--rounds R] [--quick] [--out DIR]``. Two parts, each case's
contenders timed in one process in interleaved rounds (the order rotating; :mod:`timing`), medians:

**Tiny** (fp32, x 8x64, W 64x64, r=8, one thread; on a GPU also the triton backend in bf16): the
no-grad forward (dropout off, as in inference) and forward + backward with dropout 0.1 (grads of x,
A and B; W and b frozen) of

- ``F.linear``: the base layer alone, the floor (its forward + backward computes dx);
- ``nn.Linear``: the same called as the module (what a LoRA layer replaces in a model);
- ``unfused``: the peft-style sum ``F.linear(x, W, b) + F.linear(F.linear(dropout(x), A), B) * s``;
- ``peft``: peft's ``lora.Linear`` over an ``nn.Linear``, when peft is installed;
- ``<backend> op``: :func:`fastlora.lora_linear` with ``FASTLORA_BACKEND=<backend>``;
- ``<backend> layer``: a :class:`fastlora.LoRALinear` called, on that backend;
- ``<backend> alone``: the backend's ``forward`` (and ``backward``) called directly, without the op's
  Python layer or autograd (fastlora.ops.<backend>).

for every backend available on the device (the triton backend only on a GPU: under
``TRITON_INTERPRET=1`` its kernels run in Python, far too slow to time). Each row also counts the aten
ops one call runs (``TorchDispatchMode``; an op of the C++ extension is not one) and, on a GPU, the
device kernels it launches (``torch.profiler``).

**Decode** (fp32 CPU, the eval layer's no-grad forward, 1, 2, 4 and 8 rows, 768->2304 and 1024->4096,
r=16, on 1 and 2 threads, ``--decode-threads``): ``F.linear``, the cpu backend's op, layer and backend alone.

Ratios are to ``F.linear``, ``nn.Linear`` and ``unfused`` of the same case. The tables are printed and written
to ``benchmarks/results/<date>_<machine>_overhead.md`` with the command, machine, load and date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import run
import torch
import torch.nn.functional as F
from harness import unfused_lora
from timing import calls_per_sample, interleaved, median, spread, time_calls
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora.ops.dispatch import ENV_VAR, select

TINY = (8, 64, 64, 8)  # rows, in, out, rank
DECODE_SHAPES = ((768, 2304), (1024, 4096))
DECODE_ROWS = (1, 2, 4, 8)
DECODE_RANK = 16
DROPOUT, SCALE = 0.1, 2.0
MODES = ("forward", "forward+backward")


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """``FASTLORA_BACKEND=name`` inside the block (unchanged for None)."""
    previous = os.environ.get(ENV_VAR)
    if name is not None:
        os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def aten_ops_per_call(fn: Callable[[], object]) -> int:
    """The aten ops one call of ``fn`` runs (its Python-visible dispatches)."""
    with _CountOps() as counter:
        fn()
    return counter.ops


def kernels_per_call(fn: Callable[[], object], device: str) -> int | None:
    """Device kernels (and copies) one call of ``fn`` launches on a GPU, from torch.profiler; None on the CPU."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# ---------------------------------------------------------------- contenders


class Tensors:
    """One case's tensors: x (and dy), a frozen nn.Linear, an adapter, a LoRALinear over the same weights."""

    def __init__(self, rows: int, n_in: int, n_out: int, rank: int, dropout: float, device: str,
                 dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)

        def rand(*shape: int, scale: float = 1.0) -> Tensor:
            return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

        self.x, self.dy = rand(rows, n_in).requires_grad_(), rand(rows, n_out)
        self.linear = nn.Linear(n_in, n_out, device=device, dtype=dtype).requires_grad_(False)
        self.weight, self.bias = self.linear.weight, self.linear.bias
        self.layer = fastlora.LoRALinear(self.linear, r=rank, alpha=SCALE * rank, dropout=dropout)
        with torch.no_grad():
            self.layer.lora_B.copy_(rand(n_out, rank, scale=rank**-0.5))
        self.lora_A, self.lora_B = self.layer.lora_A, self.layer.lora_B
        self.dropout = dropout
        self.seed = torch.zeros((), dtype=torch.int64)

    def grads_of(self, *tensors: Tensor) -> Callable[[Tensor], None]:
        def backward(y: Tensor) -> None:
            for t in tensors:
                t.grad = None
            y.backward(self.dy)
        return backward


def _peft_layer(t: Tensors) -> nn.Module:
    """peft's lora.Linear over the case's nn.Linear, with the case's adapter."""
    from peft import LoraConfig, inject_adapter_in_model

    rank = t.lora_A.shape[0]
    holder = nn.Module()
    holder.proj = t.linear
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=SCALE * rank, lora_dropout=t.dropout,
                                       target_modules=["proj"]), holder)
    layer = holder.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(t.lora_A)
        layer.lora_B["default"].weight.copy_(t.lora_B)
    return layer.to(t.x.device, t.x.dtype).train()


def contenders(t: Tensors, mode: str, backends: list[str]) -> dict[str, tuple[str | None, Callable[[], object]]]:
    """name -> (the backend to force, one call) for ``mode``."""
    p = t.dropout
    x, w, b, A, B = t.x, t.weight, t.bias, t.lora_A, t.lora_B
    train = mode == "forward+backward"
    fns: dict[str, tuple[str | None, Callable[[], object]]] = {}

    def add(name: str, forced: str | None, fn: Callable[[], Tensor], grads: tuple[Tensor, ...]) -> None:
        if train:
            backward = t.grads_of(*grads)
            fns[name] = (forced, lambda: backward(fn()))
        else:
            def no_grad() -> Tensor:
                with torch.no_grad():
                    return fn()
            fns[name] = (forced, no_grad)

    add("F.linear", None, lambda: F.linear(x, w, b), (x,))
    add("nn.Linear", None, lambda: t.linear(x), (x,))
    add("unfused", None, lambda: unfused_lora(x, w, b, A, B, SCALE, p), (x, A, B))
    try:
        peft = _peft_layer(t)
        add("peft", None, lambda: peft(x), (x, *peft.parameters()))
    except ImportError:
        pass
    t.layer.train(train)  # the no-grad forward runs as in inference
    for name in backends:
        add(f"{name} op", name, lambda: fastlora.lora_linear(x, w, b, A, B, SCALE, p), (x, A, B))
        add(f"{name} layer", name, lambda: t.layer(x), (x, A, B))
        fns[f"{name} alone"] = (name, _alone(name, t, train))
    return fns


def _alone(name: str, t: Tensors, train: bool) -> Callable[[], Tensor]:
    """The backend's own forward (and backward) on the case's tensors, without the op's Python layer."""
    with backend(name):
        module = select(t.x)
    x, w, b, A, B, seed = t.x.detach(), t.weight, t.bias, t.lora_A.detach(), t.lora_B.detach(), t.seed
    needs = (True, True, True)
    if not train:
        return lambda: module.forward(x, w, b, A, B, SCALE, 0.0, seed)

    def forward_backward() -> Tensor:
        y = module.forward(x, w, b, A, B, SCALE, t.dropout, seed)
        module.backward(t.dy, x, w, A, B, SCALE, t.dropout, seed, needs)
        return y
    return forward_backward


def clock(device: str) -> Callable[[], float]:
    """Thread CPU time on one CPU thread (the calls run on the calling thread, and other processes' load does
    not count), else wall time."""
    return time.thread_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def measure(fns: dict[str, tuple[str | None, Callable[[], object]]], device: str, rounds: int,
            min_sample_s: float) -> dict[str, dict]:
    """Median, spread, aten ops and device kernels of each contender, timed interleaved."""
    calls, rows = {}, {}
    for name, (forced, fn) in fns.items():
        with backend(forced):
            for _ in range(3):
                fn()
            calls[name] = calls_per_sample(fn, min_sample_s, device, most=100_000)
            rows[name] = {"aten ops": aten_ops_per_call(fn), "kernels": kernels_per_call(fn, device)}

    def sampler(name: str) -> Callable[[], float]:
        forced, fn = fns[name]

        def sample() -> float:
            with backend(forced):
                return time_calls(fn, calls[name], device, clock=clock(device))
        return sample

    samples = interleaved({name: sampler(name) for name in fns}, rounds)
    for name, s in samples.items():
        rows[name].update(us=median(s) * 1e6, spread=spread(s))
    return rows


# ---------------------------------------------------------------- tables


def _ratio(rows: dict[str, dict], name: str, base: str) -> str:
    return f"{rows[name]['us'] / rows[base]['us']:.2f}" if base in rows else "n/a"


def table(title: str, rows: dict[str, dict], bases: tuple[str, ...]) -> list[str]:
    head = ["contender", "µs per call", "spread", *(f"÷ {b}" for b in bases), "aten ops", "GPU kernels"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        kernels = "n/a" if r["kernels"] is None else str(r["kernels"])
        lines.append(f"| {name} | {r['us']:.1f} | ±{r['spread']:.0%} | "
                     + " | ".join(_ratio(rows, name, b) for b in bases) + f" | {r['aten ops']} | {kernels} |")
    return lines + [""]


def _load() -> str:
    load = run._load_average()
    return "n/a" if load is None else " ".join(f"{v:.2f}" for v in load)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- main


def tiny_cases(device: str, rounds: int, min_sample_s: float, emit: Callable[[list[str]], None]) -> None:
    rows_, n_in, n_out, rank = TINY
    available = [n for n, s in fastlora.backends().items() if s.available]
    runs = [("cpu", torch.float32, [n for n in available if n != "triton"])]
    if device == "cuda":
        runs.append(("cuda", torch.bfloat16, [n for n in available if n in ("triton", "reference")]))
    for dev, dtype, backends in runs:
        for mode in MODES:
            t = Tensors(rows_, n_in, n_out, rank, DROPOUT if mode == "forward+backward" else 0.0, dev, dtype)
            rows = measure(contenders(t, mode, backends), dev, rounds, min_sample_s)
            title = (f"Tiny, {mode}{' (dropout 0.1)' if t.dropout else ''}: {dev} {str(dtype)[6:]}, "
                     f"x {rows_}x{n_in}, W {n_out}x{n_in}, r={rank}, {torch.get_num_threads()} thread(s)")
            emit(table(title, rows, ("F.linear", "nn.Linear", "unfused")))


def decode_cases(threads: list[int], rows_list: tuple[int, ...], rounds: int, min_sample_s: float,
                 emit: Callable[[list[str]], None]) -> None:
    if not fastlora.backends()["cpu"].available:
        emit([f"Decode: skipped, the cpu backend is unavailable ({fastlora.backends()['cpu'].reason})", ""])
        return
    before = torch.get_num_threads()
    head = ["shape", "rows", "threads", "F.linear µs", "op µs", "layer µs", "alone µs", "op ÷ F.linear",
            "layer ÷ F.linear", "alone ÷ F.linear", "spread (op)"]
    lines = ["**Decode: the eval layer's no-grad forward, fp32, cpu backend, r=16**", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    try:
        for n in threads:
            torch.set_num_threads(n)
            for n_in, n_out in DECODE_SHAPES:
                for m in rows_list:
                    t = Tensors(m, n_in, n_out, DECODE_RANK, 0.0, "cpu", torch.float32)
                    fns = {k: v for k, v in contenders(t, "forward", ["cpu"]).items()
                           if k in ("F.linear", "cpu op", "cpu layer", "cpu alone")}
                    r = measure(fns, "cpu", rounds, min_sample_s)
                    f = r["F.linear"]["us"]
                    lines.append(f"| {n_in}->{n_out} | {m} | {n} | {f:.1f} | {r['cpu op']['us']:.1f} | "
                                 f"{r['cpu layer']['us']:.1f} | {r['cpu alone']['us']:.1f} | "
                                 f"{r['cpu op']['us'] / f:.3f} | {r['cpu layer']['us'] / f:.3f} | "
                                 f"{r['cpu alone']['us'] / f:.3f} | ±{r['cpu op']['spread']:.0%} |")
                    print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(before)
    emit(lines + [""])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per case")
    parser.add_argument("--min-sample-ms", type=float, default=5.0, help="each sample's length (calls repeat)")
    parser.add_argument("--quick", action="store_true", help="7 rounds, 1 and 8 decode rows, 2 ms samples")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--decode-threads", default="1,2",
                        help="comma-separated thread counts for decode (on a loaded machine, 2 threads time waits)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.min_sample_ms = 7, 2.0
    rows_list = (1, 8) if args.quick else DECODE_ROWS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    now = datetime.datetime.now(datetime.timezone.utc)
    cpu = run.device_name("cpu")
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    isa = ""
    if fastlora.backends()["cpu"].available:
        from fastlora.ops import cpu as cpu_backend
        isa = f", cpu kernels {cpu_backend.isa()}, base GEMM {cpu_backend.gemm()}"
    header = [f"# Per-call overhead, {now:%Y-%m-%d %H:%M} UTC, commit {run._checkout()}", "",
              f"`{command.strip()}`", "",
              f"{cpu}{' + ' + torch.cuda.get_device_name() if device == 'cuda' else ''}; torch {torch.__version__}"
              f"{isa}; load average before: {_load()}", "",
              f"Medians of {args.rounds} interleaved rounds; spread = half the interquartile range over the median. "
              "On one CPU thread the clock is the thread's CPU time (other processes' load does not count), "
              "else wall time.", ""]
    out = args.out / f"{now:%Y-%m-%d}_{run._slug(cpu)}_overhead.md"
    lines = list(header)

    def emit(block: list[str]) -> None:
        print("\n".join(block), flush=True)
        lines.extend(block)
        write_atomically(out, "\n".join(lines) + "\n")  # a run cut short keeps what it measured

    print("\n".join(header), flush=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_cases(device, args.rounds, args.min_sample_ms / 1e3, emit)
    finally:
        torch.set_num_threads(before)
    if not args.skip_decode:
        threads = [int(n) for n in args.decode_threads.split(",")]
        decode_cases(threads, rows_list, args.rounds, args.min_sample_ms / 1e3, emit)
    emit([f"Load average after: {_load()}"])
    return out


if __name__ == "__main__":
    main()
