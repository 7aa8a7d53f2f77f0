"""The benchmarks run: every contender on a tiny case, the rows they append to the CSV, the timing and memory
measures, the plot, and each CPU-capable benchmark script at its smallest settings."""

import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_cpu_kernels
import bench_dora
import bench_layer
import bench_mixed
import bench_overhead
import bench_train_step
import contenders
import measure
import plot
import runner
from contenders import Contender, Spec

import fastlora

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[runner.Run, list[dict]]:
    """One ``bench_layer.py --smoke`` on the CPU, shared by the tests that read its rows, and the CSV's rows."""
    csv = tmp_path_factory.mktemp("results") / "all.csv"
    run = bench_layer.main(["--smoke", "--device", "cpu", "--repeats", "2", "--threads", "1", "--csv", str(csv)])
    return run, runner.read(csv)


def test_every_available_contender_runs_each_mode_and_dropout(smoke):
    _, rows = smoke
    spec = bench_layer.make_suite("smoke", "cpu").cases[0].spec
    expected = {(c.name, mode, p) for c in contenders.pick(spec)[0] for mode in c.modes for p in (0.0, 0.1)}
    seen = {(r["contender"], r["params"]["mode"], r["params"]["dropout"]) for r in rows if r["metric"] == "time"}
    assert seen == expected
    assert all(r["value"] > 0 for r in rows if r["metric"] == "time")


def test_rows_say_where_they_come_from_and_ratios_stay_within_their_case(smoke):
    run, rows = smoke
    assert [r["run"] for r in rows] == [run.meta["run"]] * len(rows) == [r["run"] for r in run.rows]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCHMARKS, capture_output=True, text=True).stdout.strip()
    for r in rows:
        assert r["benchmark"] == "layer" and r["device"] == runner.device_name("cpu")
        assert r["commit"].removesuffix("-dirty") == head and r["torch"] == torch.__version__
        assert r["command"].startswith("python benchmarks/bench_layer.py --smoke") and r["date"].endswith("+00:00")
        assert r["threads"] == 1
    values = {(r["case"], r["metric"], r["contender"]): r["value"] for r in rows}
    ratios = [r for r in rows if r["ratio"] is not None]
    assert {r["metric"] for r in ratios} == {"time", "saved", "saved beyond x"}
    for r in ratios:  # each ratio is the value over its baseline's in the same case, metric and run
        assert r["baseline"] == "unfused"
        assert r["ratio"] == pytest.approx(r["value"] / values[r["case"], r["metric"], "unfused"])


def test_lora_contenders_compute_the_same_layer(smoke):
    _, rows = smoke
    errors = {r["contender"]: r["value"] for r in rows if r["metric"] == "rel err"}
    assert set(errors) >= {"unfused", "merged", "reference op", "reference layer", "peft", "loralib"}
    assert all(error < 1e-5 for error in errors.values()), errors


def test_saved_bytes_count_activations_once_and_skip_parameters():
    t = contenders.make_tensors(Spec(5, 24, 40, 3))
    x_bytes, h_bytes = 5 * 24 * 4, 5 * 3 * 4
    # F.linear with W frozen saves only W (a parameter): nothing counts
    assert bench_layer.saved_bytes(contenders.f_linear(t), t) == (0, 0)
    # unfused saves x (for dA, x is also the input) and h = x·Aᵀ (for dB); W and A are parameters
    assert bench_layer.saved_bytes(contenders.unfused(t), t) == (x_bytes + h_bytes, h_bytes)


def test_side_by_side_reports_seconds_per_call():
    """A contender that sleeps 10 ms per call, timed beside F.linear: its samples are 10 to 20 ms per call
    (not the whole sample's time, which holds several calls), and it is the slower of the two in every round."""
    x = torch.randn(8, 8)
    fns = {"sleeper": partial(time.sleep, 0.01), "F.linear": lambda: torch.nn.functional.linear(x, x)}
    samples = measure.side_by_side(fns, 3, min_sample_s=0.04)
    assert all(0.01 <= s < 0.02 for s in samples["sleeper"]), samples
    assert all(f < s for f, s in zip(samples["F.linear"], samples["sleeper"], strict=True)), samples


def test_interleaved_rounds_rotate_the_order_and_keep_every_sample():
    order = []
    samples = measure.interleaved({name: (lambda name=name: order.append(name) or 1.0) for name in "abc"}, 3)
    assert order == list("abcbcacab") and samples == {name: [1.0] * 3 for name in "abc"}
    assert measure.spread([1.0, 1.0, 3.0, 3.0]) == 0.5 and measure.median([3.0, 1.0, 2.0]) == 2.0


def test_aten_ops_per_call_counts_the_ops_one_call_dispatches():
    x = torch.ones(3, 4)
    assert measure.aten_ops_per_call(lambda: x + 1) == 1
    assert measure.aten_ops_per_call(lambda: (x @ x.t()).relu().sum()) == 4  # t, mm, relu, sum


def test_times_are_recorded_in_their_unit_with_ratios_to_the_baseline_medians():
    run = runner.Run("unit", __file__, [], csv_path=None)
    medians = run.record_times("case", {"k": 1}, {"F.linear": [1.0, 1.0], "unfused": [3.0, 2.0, 4.0], "x": [2.0]},
                               baseline="unfused", unit="ms")
    assert medians == {"F.linear": 1.0, "unfused": 3.0, "x": 2.0}
    by_name = {r["contender"]: r for r in run.rows}
    assert by_name["x"]["value"] == 2000.0 and by_name["x"]["unit"] == "ms"
    assert by_name["x"]["ratio"] == pytest.approx(2 / 3) and by_name["unfused"]["ratio"] == 1.0
    assert by_name["unfused"]["spread"] == pytest.approx(0.5 / 3) and by_name["unfused"]["rounds"] == 3


def test_a_csv_with_other_columns_is_refused(tmp_path):
    csv = tmp_path / "old.csv"
    csv.write_text("benchmark,value\nx,1\n")
    with pytest.raises(RuntimeError, match="columns"):
        runner.Run("x", __file__, [], csv).record("case", {}, "c", "time", 1.0, "ms")
    assert csv.read_text() == "benchmark,value\nx,1\n"


def test_plot_draws_the_latest_matching_run(smoke, tmp_path, capsys):
    run, _ = smoke
    csv = Path(run.csv)
    out = plot.main(["--csv", str(csv), "--benchmark", "layer", "--out", str(tmp_path / "speedup.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main(["--csv", str(csv), "--list"]) is None
    assert run.meta["run"] in capsys.readouterr().out
    rows = runner.read(csv)
    later = [{**r, "run": "later", "date": "9999"} for r in rows[:3]]
    assert {r["run"] for r in plot.select(rows + later, "layer")} == {"later"}  # one run per chart, the latest


def test_a_peft_dora_contender_is_one_entry():
    dora = Contender("peft dora", partial(contenders.peft_layer, use_dora=True), needs="peft")
    spec = Spec(6, 16, 24, 4, 0.1)
    assert dora.unavailable(spec) == ""
    t = contenders.make_tensors(spec)
    built = dora.build(t)
    built.fn(t.x).backward(t.grads[0])
    assert built.module.use_dora == {"default": True} and t.x.grad is not None


def test_training_step_runs_every_variant(monkeypatch):
    """Every variant runs; each timed sample covers its step (timed here too, from inside) and little more, and
    tokens/s is the tokens over the median step."""
    steps: dict[str, list[float]] = {}
    step = bench_train_step.Trainer.step

    def timed_inside(trainer):
        begin = time.perf_counter()
        step(trainer)
        steps.setdefault(trainer.variant, []).append(time.perf_counter() - begin)

    monkeypatch.setattr(bench_train_step.Trainer, "step", timed_inside)
    run = runner.Run("train_step", __file__, [], csv_path=None)
    case = bench_train_step.StepCase("small", 1, 8, n_layer=1)
    rows = bench_train_step.measure_step(run, case, repeats=2, warmup=1)
    value = {(r["metric"], r["contender"]): r["value"] for r in rows}
    assert {name for metric, name in value if metric == "time"} == set(contenders.MODELS)
    assert value["trainable", "floor"] == 0
    assert value["trainable", "fastlora"] == value["trainable", "loralib"] > 0  # q,v only: the same parameters
    for name in contenders.MODELS:
        assert value["saved", name] > 0
        inside = steps[name][-2:]  # the timed steps are the last two
        assert min(inside) <= value["time", name] < max(inside) + 0.1, (name, value["time", name], inside)
        assert value["throughput", name] == pytest.approx(8 / value["time", name])


def test_overhead_prints_its_tables_and_appends_its_rows(tmp_path, capsys):
    csv = tmp_path / "all.csv"
    bench_overhead.main(["--quick", "--rounds", "2", "--min-sample-ms", "0.2", "--skip-decode", "--csv", str(csv)])
    text = capsys.readouterr().out
    assert "python benchmarks/bench_overhead.py --quick" in text and "load average" in text
    for mode in ("forward", "forward+backward"):
        assert f"Tiny, {mode}" in text
    names = ["F.linear", "nn.Linear", "unfused", "peft"] + [f"{b} {kind}" for b, s in fastlora.backends().items()
                                                            if s.available and b != "triton"
                                                            for kind in ("op", "layer", "alone")]
    for name in names:
        lines = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        assert len(lines) >= 2, name  # one per mode (on a GPU, more for the bf16 cases there)
        assert all(float(line.split("|")[2]) > 0 for line in lines), lines
    times = [r for r in runner.read(csv) if r["metric"] == "time" and r["params"]["device"] == "cpu"]
    assert sorted(r["contender"] for r in times) == sorted(names * 2)
    assert all(r["baseline"] == "F.linear" and r["unit"] == "us" and r["threads"] == 1 for r in times)


def test_mixed_batches_and_cpu_kernels_run_at_their_smallest(tmp_path):
    csv = tmp_path / "all.csv"
    bench_mixed.main(["--smoke", "--threads", "1", "--csv", str(csv)])
    bench_cpu_kernels.main(["--smoke", "--threads", "1", "--csv", str(csv)])
    rows = runner.read(csv)
    mixed = {r["contender"] for r in rows if r["benchmark"] == "mixed"}
    assert mixed == {"F.linear", "fastlora mixed", "backend mixed", "peft mixed", "separate ops"}
    kernels = {r["contender"] for r in rows if r["benchmark"] == "cpu_kernels"}
    if fastlora.backends()["cpu"].available:
        assert kernels == {"cpu op", "F.linear", "unfused", "cpu alone, torch", "cpu alone, openblas"}
    assert all(r["value"] > 0 for r in rows)


def test_dora_benchmark_runs_at_its_smallest(tmp_path):
    """Every contender and mode timed with its ratio to fastlora's LoRA op; peak memory from its own processes."""
    csv = tmp_path / "all.csv"
    bench_dora.main(["--smoke", "--threads", "1", "--csv", str(csv)])
    rows = runner.read(csv)
    times = [r for r in rows if r["metric"] == "time"]
    assert {(r["contender"], r["params"]["mode"]) for r in times} == \
        {(name, mode) for name in bench_dora.CONTENDERS for mode in bench_dora.MODES}
    assert all(r["value"] > 0 and r["baseline"] == "fastlora lora" and r["threads"] == 1 for r in times)
    if sys.platform.startswith("linux"):
        peaks = [r for r in rows if r["metric"] == "peak with inputs"]
        assert {r["contender"] for r in peaks} == set(bench_dora.CONTENDERS) and all(r["value"] > 0 for r in peaks)
