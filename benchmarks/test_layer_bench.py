"""pytest-benchmark suites: forward and forward+backward of every contender on the quick cases.

    pytest benchmarks/test_layer_bench.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
    pytest benchmarks/test_layer_bench.py -k "backward and 768x2304"     # one shape, forward+backward

Each case is a benchmark group, so pytest-benchmark's table compares the contenders within it.
pytest-benchmark times one contender after another; ``run.py`` interleaves them and reports ratios.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import harness
import pytest
import torch
from run import make_suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = make_suite("quick", DEVICE).cases
POOL, _ = harness.contenders(DEVICE)


def case_id(c: harness.Case) -> str:
    """A ``-k``-friendly id, e.g. ``backward-768x2304-M512-r16-p0.1-float32``."""
    return f"{c.mode}-{c.in_features}x{c.out_features}-M{c.tokens}-r{c.rank}-p{c.dropout}-{c.dtype}"


@pytest.mark.parametrize("contender", POOL, ids=lambda c: c.name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer(benchmark, case: harness.Case, contender: harness.Contender) -> None:
    if case.mode not in contender.modes:
        pytest.skip(f"{contender.name} has no {case.mode} mode")
    inputs = harness.make_inputs(case)
    with contender.active():
        built = contender.build(inputs)

        def once() -> None:
            harness.call(built, inputs, case.mode, 0)
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark.group = f"{case.mode} {case.label}"
        if case.mode == "backward":
            saved, beyond = harness.saved_bytes(built, inputs)
            benchmark.extra_info.update(saved_bytes=saved, saved_bytes_beyond_input=beyond)
        benchmark.pedantic(once, warmup_rounds=2, rounds=10)
