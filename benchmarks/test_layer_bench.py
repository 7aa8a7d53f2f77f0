"""pytest-benchmark suites: forward and forward+backward of every contender on the quick cases.

    pytest benchmarks/test_layer_bench.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
    pytest benchmarks/test_layer_bench.py -k "backward and 768x2304"     # one shape, forward+backward

Each case is a benchmark group, so pytest-benchmark's table compares the contenders within it.
pytest-benchmark times one contender after another; ``run.py`` interleaves them and reports ratios.
Each item also checks that what it timed computes the layer: the same contender with dropout off
against a float64 reference (``plain``: against the base product alone).
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import harness
import pytest
import torch
from run import make_suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = make_suite("quick", DEVICE).cases
POOL, _ = harness.contenders(DEVICE)
PAIRS = [(case, contender) for case in CASES for contender in POOL if case.mode in contender.modes]
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def case_id(c: harness.Case) -> str:
    """A ``-k``-friendly id, e.g. ``backward-768x2304-M512-r16-p0.1-float32``."""
    return f"{c.mode}-{c.in_features}x{c.out_features}-M{c.tokens}-r{c.rank}-p{c.dropout}-{c.dtype}"


def rel_err_without_dropout(case: harness.Case, contender: harness.Contender) -> float:
    """The contender's forward with dropout off against float64 (``plain`` against x·Wᵀ + b)."""
    inputs = harness.make_inputs(replace(case, dropout=0.0))
    with contender.active(), torch.no_grad():
        y = contender.build(inputs).fn(inputs.xs[0]).double()
    x, w, a, b = (t.detach().double() for t in (inputs.xs[0], inputs.weight, inputs.lora_A, inputs.lora_B))
    expected = x @ w.t() + inputs.bias.double()
    if contender.name != "plain":
        expected = expected + inputs.scale * (x @ a.t()) @ b.t()
    return float((y - expected).norm() / expected.norm())


@pytest.mark.parametrize(("case", "contender"), PAIRS, ids=[f"{case_id(c)}-{k.name}" for c, k in PAIRS])
def test_layer(benchmark, case: harness.Case, contender: harness.Contender) -> None:
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
    if case.mode == "backward":  # the backward ran: x and the LoRA parameters (the contender's own, if any) got grads
        own = [t for t in built.params if t.requires_grad]
        lora = own or ([] if contender.name == "plain" else [inputs.lora_A, inputs.lora_B])
        assert all(t.grad is not None for t in (inputs.xs[0], *lora))
    assert rel_err_without_dropout(case, contender) <= TOLERANCE[case.dtype]
