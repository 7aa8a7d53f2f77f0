"""The benchmark suite runs: every contender on a tiny case, memory counting, the outputs it writes."""

import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import harness
import overhead
import run
import timing
import train_step

import fastlora

pytest_plugins = ("pytester",)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    """One ``run.py --smoke`` on CPU (layer cases only), shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("results")
    report = run.main(["--smoke", "--device", "cpu", "--no-train-step", "--repeats", "2", "--out", str(out)])
    return report, out


def test_every_available_contender_runs_each_mode_and_dropout(smoke):
    report, _ = smoke
    pool, _ = harness.contenders("cpu")
    expected = {(c.name, mode, p) for c in pool for mode in c.modes for p in (0.0, 0.1)}
    seen = {(r["contender"], r["case"]["mode"], r["case"]["dropout"]) for r in report["layer"]}
    assert seen == expected
    failures = [(r["contender"], r["reason"]) for r in report["layer"] if r["status"] != "ok"]
    assert failures == []
    medians = {(r["contender"], r["case"]["mode"], r["case"]["dropout"]): r["median_s"] for r in report["layer"]}
    for row in report["layer"]:  # the reported figures agree with the samples they come from
        mode, p = row["case"]["mode"], row["case"]["dropout"]
        assert len(row["samples"]) == 2 and row["median_s"] == statistics.median(row["samples"]) > 0
        assert row["speedup_vs_unfused"] == pytest.approx(medians["unfused", mode, p] / row["median_s"])
        assert row["overhead_vs_plain"] == pytest.approx(row["median_s"] / medians["plain", mode, p] - 1)


def test_timing_reports_seconds_per_call():
    """A contender that sleeps 10 ms per call, timed beside F.linear: its samples are 10 to 20 ms per call
    (not the whole sample's time), and it is the slower of the two in every round."""
    def build_sleeper(inputs: harness.Inputs) -> harness.Built:
        def fn(x):
            time.sleep(0.01)
            return x
        return harness.Built(fn)

    pool = [harness.Contender("sleeper", build_sleeper, modes=("forward",)),
            *(c for c in harness.contenders("cpu")[0] if c.name == "plain")]
    results = {r.contender: r for r in harness.measure(harness.Case(8, 8, 2, 1, 0.0, "forward"), pool, repeats=3,
                                                       min_sample_s=0.04)}
    sleeper, plain = results["sleeper"], results["plain"]
    assert sleeper.status == plain.status == "ok" and sleeper.calls_per_sample >= 2
    assert all(0.01 <= s < 0.02 for s in sleeper.samples), sleeper.samples
    assert all(p < s for p, s in zip(plain.samples, sleeper.samples, strict=True)), (plain.samples, sleeper.samples)


def test_lora_contenders_compute_the_same_layer(smoke):
    report, _ = smoke
    checked = [r for r in report["layer"] if r["rel_err"] is not None]
    assert {r["contender"] for r in checked} >= {"unfused", "merged", "fastlora-reference", "peft", "loralib"}
    assert all(r["rel_err"] < 1e-5 for r in checked), [(r["contender"], r["rel_err"]) for r in checked]


def test_outputs_are_valid_json_markdown_and_png(smoke):
    report, out = smoke
    stem = report["meta"]["stem"]
    assert stem.endswith("_smoke") and report["meta"]["device_tag"] in stem
    data = json.loads((out / f"{stem}.json").read_text(), parse_constant=pytest.fail)  # strict: no NaN
    assert data["meta"]["threads"] == torch.get_num_threads()
    assert len(data["layer"]) == len(report["layer"])
    md = (out / f"{stem}.md").read_text()
    assert "| fastlora-reference |" in md and "python benchmarks/run.py --smoke" in md
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_bytes_count_activations_once_and_skip_parameters():
    case = harness.Case(24, 40, 5, 3, 0.0, "backward")
    inputs = harness.make_inputs(case)
    pool = {c.name: c for c in harness.contenders("cpu")[0]}
    x_bytes, h_bytes = 5 * 24 * 4, 5 * 3 * 4
    # plain F.linear with W frozen saves only W (a parameter): nothing counts
    assert harness.saved_bytes(pool["plain"].build(inputs), inputs) == (0, 0)
    # unfused saves x (for dA, x is also the input) and h = x·Aᵀ (for dB); W and A are parameters
    assert harness.saved_bytes(pool["unfused"].build(inputs), inputs) == (x_bytes + h_bytes, h_bytes)


def test_ratios_are_relative_to_unfused_and_plain():
    case = harness.Case(8, 8, 1, 1, 0.0, "forward")
    results = [harness.Result(case, name, samples=[t]) for name, t in (("plain", 1.0), ("unfused", 3.0), ("x", 2.0))]
    assert harness.ratios(results)["x"] == {"speedup_vs_unfused": 1.5, "overhead_vs_plain": 1.0}


def test_training_step_runs_every_variant(monkeypatch):
    """Every variant runs; each timed sample covers its step (timed here too, from inside) and little more, and
    tokens/s is the tokens over the median sample."""
    steps: dict[str, list[float]] = {}
    step = train_step._Trainer.step

    def timed_inside(trainer):
        begin = time.perf_counter()
        step(trainer)
        steps.setdefault(trainer.variant, []).append(time.perf_counter() - begin)

    monkeypatch.setattr(train_step._Trainer, "step", timed_inside)
    case = train_step.StepCase("small", 1, 8, n_layer=1)
    results = {r.variant: r for r in train_step.measure_step(case, repeats=2, warmup=1)}
    assert {name: r.reason for name, r in results.items() if r.status != "ok"} == {}
    assert results["floor"].trainable == 0
    assert results["fastlora"].trainable == results["loralib"].trainable > 0  # q,v only: the same parameters
    for name, r in results.items():
        assert r.saved_bytes > 0
        for sample, inside in zip(r.samples, steps[name][-2:], strict=True):  # the timed steps are the last two
            assert inside <= sample < inside + 0.1, (name, r.samples, steps[name])
        assert r.tokens_per_s == pytest.approx(8 / statistics.median(r.samples))


def test_layer_benchmark_suite_has_an_item_per_mode_and_each_checks_its_contender(pytester):
    """benchmarks/test_layer_bench.py, untimed on the M=8 768->2304 cases: an item per contender and mode it has
    (none that skips), each passing its check against float64. (Not unfused-compiled: compiling takes minutes.)"""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "test_layer_bench.py"
    pool = [c for c in harness.contenders("cpu")[0] if c.name != "unfused-compiled"]
    result = pytester.runpytest_subprocess(str(bench), "--benchmark-disable", "-p", "no:cacheprovider",
                                           "-k", "M8 and 768x2304 and not compiled")
    result.assert_outcomes(passed=sum(len(c.modes) for c in pool))


def test_interleaved_rounds_rotate_the_order_and_keep_every_sample():
    order = []
    samples = timing.interleaved({name: (lambda name=name: order.append(name) or 1.0) for name in "abc"}, 3)
    assert order == list("abcbcacab") and samples == {name: [1.0] * 3 for name in "abc"}
    assert timing.spread([1.0, 1.0, 3.0, 3.0]) == 0.5 and timing.median([3.0, 1.0, 2.0]) == 2.0


def test_aten_ops_per_call_counts_the_ops_one_call_dispatches():
    x = torch.ones(3, 4)
    assert overhead.aten_ops_per_call(lambda: x + 1) == 1
    assert overhead.aten_ops_per_call(lambda: (x @ x.t()).relu().sum()) == 4  # t, mm, relu, sum


def test_overhead_report_times_every_contender_and_writes_its_table(tmp_path):
    out = overhead.main(["--quick", "--rounds", "2", "--min-sample-ms", "0.2", "--skip-decode", "--out", str(tmp_path)])
    text = out.read_text()
    assert out.parent == tmp_path and out.name.endswith("_overhead.md")
    assert "python benchmarks/overhead.py --quick" in text and "load average" in text
    for mode in ("forward", "forward+backward"):
        assert f"Tiny, {mode}" in text
    names = ["F.linear", "nn.Linear", "unfused", "peft"] + [f"{b} {kind}" for b, s in fastlora.backends().items()
                                              if s.available and b != "triton" for kind in ("op", "layer", "alone")]
    for name in names:
        rows = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == 2, name  # one per mode
        assert all(float(row.split("|")[2]) > 0 for row in rows), rows
