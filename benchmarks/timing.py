"""The timing every benchmark script shares: seconds per call, interleaved rounds, medians and spreads.

:func:`time_calls` times back-to-back calls of one function (CUDA events on a GPU, or wall time with
the device synchronised; ``time.perf_counter`` on the CPU). :func:`interleaved` takes one sample of
each contender per round, the order rotating every round, so that load from other processes hits
them all alike; the samples are kept so that medians and spreads can be reported.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch


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


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else math.nan


def spread(samples: list[float]) -> float:
    """Half the interquartile range relative to the median (0.05 reads as ±5%)."""
    if len(samples) < 2:
        return math.nan
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / 2 / statistics.median(samples)


def median_times(fns: dict[str, Callable[[], object]], rounds: int, calls: int = 1, device: str = "cpu",
                 warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function: ``warmup`` calls each, then ``rounds`` interleaved samples
    of ``calls`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samplers = {name: (lambda fn=fn: time_calls(fn, calls, device)) for name, fn in fns.items()}
    return {name: median(s) for name, s in interleaved(samplers, rounds).items()}
