"""How the benchmarks measure a call: its time (interleaved, CUDA events, graph replays, host time), memory and work.

:func:`side_by_side` is the method every ratio rests on: the contenders of one case are warmed up, then timed in
interleaved rounds in one process, the order rotating every round, so that load from other processes hits them
all alike; every sample is kept so that medians and spreads can be reported.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

Context = Callable[[], contextlib.AbstractContextManager]

# ---------------------------------------------------------------- time


def time_calls(fn: Callable[[], object], calls: int = 1, device: str = "cpu", events: bool = True,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``fn``. On CUDA: the GPU's time between CUDA
    events recorded around the calls, or with ``events=False`` the wall time with the device synchronised
    before and after (host time included). Else ``clock``'s time: wall time, or ``time.thread_time`` for
    work on the calling thread alone, which other processes' load does not inflate."""
    if device == "cuda" and events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    if device == "cuda":
        torch.cuda.synchronize()
    begin = clock()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (clock() - begin) / calls


def calls_per_sample(fn: Callable[[], object], min_sample_s: float, device: str = "cpu", most: int = 1000) -> int:
    """How many back-to-back calls of ``fn`` last about ``min_sample_s`` (one timed call calibrates), at most
    ``most``."""
    once = time_calls(fn, 1, device)
    return max(1, min(most, round(min_sample_s / max(once, 1e-9))))


def interleaved(samplers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """``rounds`` samples of each sampler (a function returning one timing), one of each per round, the
    order rotating by one every round."""
    names = list(samplers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            samples[name].append(samplers[name]())
    return samples


def side_by_side(fns: dict[str, Callable[[], object]], rounds: int, device: str = "cpu", *,
                 min_sample_s: float = 0.02, calls: int | None = None, warmup: int = 1, most: int = 1000,
                 events: bool = True, clock: Callable[[], float] = time.perf_counter,
                 contexts: dict[str, Context] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` interleaved samples each (:func:`interleaved`).

    Each function first runs ``warmup`` times; a sample times ``calls`` back-to-back calls, or (None) as many
    as last about ``min_sample_s`` (at most ``most``), timed as :func:`time_calls` does with ``events`` and
    ``clock``. ``contexts[name]()`` is entered around everything a function runs (e.g. forcing a backend); the
    time to enter it is not counted.
    """
    contexts = contexts or {}
    per_sample = {}
    for name, fn in fns.items():
        with contexts.get(name, contextlib.nullcontext)():
            for _ in range(warmup):
                fn()
            per_sample[name] = calls or calls_per_sample(fn, min_sample_s, device, most)

    def sampler(name: str) -> Callable[[], float]:
        def sample() -> float:
            with contexts.get(name, contextlib.nullcontext)():
                return time_calls(fns[name], per_sample[name], device, events, clock)
        return sample

    return interleaved({name: sampler(name) for name in fns}, rounds)


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else math.nan


def spread(samples: list[float]) -> float:
    """Half the interquartile range relative to the median (0.05 reads as ±5%)."""
    if len(samples) < 2:
        return math.nan
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / 2 / statistics.median(samples)


def host_time(fn: Callable[[], object], iters: int = 50) -> float:
    """Median seconds for a call of ``fn`` to return, the GPU not waited for (the host's share of a call)."""
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(samples)


def capture(fn: Callable[[], object], calls: int = 1, warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, object]:
    """``calls`` calls of ``fn`` captured in one CUDA graph, warmed up on a side stream first as capture requires;
    returns the graph and what the last captured call returned (its static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    return graph, out


def graph_side_by_side(fns: dict[str, Callable[[], object]], rounds: int, calls: int = 10) -> dict[str, list[float]]:
    """Seconds per call of each function replayed from a CUDA graph of ``calls`` calls (the GPU's time without the
    host's launch work), timed as :func:`side_by_side` does. A function that cannot be captured is left out."""
    graphs = {}
    for name, fn in fns.items():
        try:
            graphs[name] = capture(fn, calls)[0]
        except Exception as error:  # a contender that cannot be captured keeps its eager time only
            print(f"  {name}: CUDA graph capture failed: {error!r}", flush=True)
            torch.cuda.synchronize()
    samples = side_by_side({name: graph.replay for name, graph in graphs.items()}, rounds, "cuda", calls=1, warmup=2)
    return {name: [s / calls for s in per_replay] for name, per_replay in samples.items()}


# ---------------------------------------------------------------- memory


def saved_storages(forward: Callable[[], Tensor], exclude: Iterable[Tensor] = ()) -> tuple[Tensor, dict[int, int]]:
    """Run ``forward`` and return its output and the storages it saved for backward (bytes by storage address),
    each storage counted once, those of ``exclude`` (parameters) left out, so that only activations count."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, seen


def peak_bytes(fn: Callable[[], object]) -> int:
    """CUDA memory allocated at the peak of one call of ``fn``, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ---------------------------------------------------------------- work


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def aten_ops_per_call(fn: Callable[[], object]) -> int:
    """The aten ops one call of ``fn`` runs (its Python-visible dispatches; a C++ extension's own work is none)."""
    with _CountOps() as counter:
        fn()
    return counter.ops


def kernels_per_call(fn: Callable[[], object], calls: int = 1) -> float:
    """Device kernels (and memsets and copies) per call of ``fn`` on a GPU, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / calls
