"""One LoRA layer against the ways LoRA is usually computed: time, memory saved for backward, error, per case.

    python benchmarks/bench_layer.py --quick                  # < 3 min on 2 CPU cores; the default
    python benchmarks/bench_layer.py --full                   # the whole grid (hours on a CPU)
    python benchmarks/bench_layer.py --reference-vs-unfused   # the reference backend vs peft-style eager, fp32 CPU
    python benchmarks/bench_layer.py --gpu                    # bf16 GPT-2 Medium/Large shapes, eager and graph replays
    python benchmarks/bench_layer.py --smoke                  # seconds: every contender on a tiny case

Each case's contenders (benchmarks/contenders.py) share its tensors, are built and warmed up, then timed side by
side (:func:`measure.side_by_side`); on CUDA with CUDA events and inputs rotating through copies larger than L2.
Modes: ``forward`` runs under ``torch.no_grad()`` (dropout active when the case has it); ``backward`` runs forward
and backward with W and b frozen and grads for x, A and B. Rows (benchmark ``layer``): ``time`` ms, on CUDA with
``--gpu`` also ``graph time`` (replayed from a CUDA graph: the GPU's time alone), ``saved`` and ``saved beyond x``
MiB (activations kept for backward), ``peak`` MiB on CUDA, each with its ratio to ``unfused``; ``rel err`` against
float64 at dropout 0.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import internals
import torch
from contenders import MODES, Built, Spec, Tensors, make_tensors, pick
from measure import graph_side_by_side, peak_bytes, saved_storages, side_by_side
from runner import Run, arguments, table

import fastlora

ALL_SHAPES = ((768, 2304), (768, 768), (1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024),
              (1280, 3840), (1280, 5120), (5120, 1280))
QUICK_SHAPES = ((768, 2304), (1024, 4096), (4096, 1024))
MEDIUM_SHAPES = ((1024, 3072), (1024, 4096), (4096, 1024))
GPU_SHAPES = ((1024, 3072), (1024, 4096), (4096, 1024), (1280, 3840), (1280, 5120))  # GPT-2 Medium and Large
ALL_TOKENS = (1, 8, 128, 512, 2048, 8192)
CPU_MAX_TOKENS = 2048
BASELINE = "unfused"
MIB = 2**20


@dataclass(frozen=True)
class Case:
    """A layer and a mode."""

    spec: Spec
    mode: str

    @property
    def label(self) -> str:
        return f"{self.spec.label} {self.mode}"

    @property
    def params(self) -> dict:
        return {**self.spec.params(), "mode": self.mode}


@dataclass
class Suite:
    """What one run measures and how hard it tries."""

    name: str
    cases: list[Case]
    repeats: int = 5
    min_sample_s: float = 0.02
    contenders: tuple[str, ...] | None = None  # None: every available contender
    graphs: bool = False  # on CUDA, also time replays of a CUDA graph


def _dtypes(device: str) -> tuple[str, ...]:
    return ("bfloat16", "float16") if device == "cuda" else ("float32",)


def _grid(device: str, shapes, tokens, ranks, dropouts, dtypes=None, modes=MODES, conv1d=False) -> list[Case]:
    return [Case(Spec(m, i, o, r, p, dtype, device, conv1d=conv1d), mode)
            for (i, o), m, r, p, dtype, mode in itertools.product(
                shapes, tokens, ranks, dropouts, dtypes or _dtypes(device), modes)]


def make_suite(name: str, device: str) -> Suite:
    """The named suite for ``device``."""
    gpu = device == "cuda"
    if name == "smoke":
        return Suite(name, _grid(device, ((64, 96),), (16,), (4,), (0.0, 0.1), _dtypes(device)[:1]), repeats=2,
                     min_sample_s=0.001)
    if name == "quick":
        tokens = (512, 8192) if gpu else (8, 512)
        return Suite(name, _grid(device, QUICK_SHAPES, tokens, (16,), (0.1,), _dtypes(device)[:1]), repeats=7)
    if name == "full":
        tokens = ALL_TOKENS if gpu else tuple(m for m in ALL_TOKENS if m <= CPU_MAX_TOKENS)
        return Suite(name, _grid(device, ALL_SHAPES, tokens, (4, 16, 64), (0.0, 0.1)), repeats=9, min_sample_s=0.05)
    if name == "reference-vs-unfused":
        cases = _grid("cpu", MEDIUM_SHAPES, (2048,), (4, 16), (0.1,), ("float32",), ("backward",))
        return Suite(name, cases, repeats=9, min_sample_s=0.2, contenders=("reference op", "unfused", "F.linear"))
    if name == "gpu":  # GPT-2's Conv1D weights, the triton backend against cuBLAS and peft-style eager
        cases = _grid(device, GPU_SHAPES, (2048, 8192, 16384), (4, 16), (0.0, 0.1), ("bfloat16",), conv1d=True)
        return Suite(name, cases, repeats=7, contenders=("triton op", "F.linear", "unfused"), graphs=True)
    raise ValueError(f"unknown suite {name!r}")


# ---------------------------------------------------------------- one case


def call(built: Built, t: Tensors, mode: str, i: int) -> None:
    """One forward (no grad) or forward + backward on the ``i``-th rotated copy of x."""
    x = t.xs[i % len(t.xs)]
    if mode == "forward":
        with torch.no_grad():
            built.fn(x)
        return
    for tensor in (x, *built.grads):
        tensor.grad = None
    built.fn(x).backward(t.grads[i % len(t.grads)])


def stepper(built: Built, t: Tensors, mode: str) -> Callable[[], None]:
    """One :func:`call` per call, each on the next rotated copy of x."""
    counter = itertools.count()
    return lambda: call(built, t, mode, next(counter))


def float64_expected(t: Tensors) -> torch.Tensor:
    x, w, a, b = (v.detach().double() for v in (t.x, t.weight, t.lora_A, t.lora_B))
    return x @ w.t() + t.bias.double() + t.spec.scale * (x @ a.t()) @ b.t()


def rel_err(built: Built, t: Tensors, expected: torch.Tensor) -> float:
    """Relative Frobenius error of the forward against ``expected``."""
    with torch.no_grad():
        y = built.fn(t.x).double()
    return float((y - expected).norm() / expected.norm())


def saved_bytes(built: Built, t: Tensors) -> tuple[int, int]:
    """Bytes saved for backward by one forward: (all activations, activations beyond the input x). Parameters
    (W, b, A, B, the contender's own) do not count; x does not in the second figure, since in a model the layer
    before keeps it alive anyway."""
    y, seen = saved_storages(lambda: built.fn(t.x), (t.weight, t.bias, t.lora_A, t.lora_B, *built.grads))
    y.backward(t.grads[0])
    total = sum(seen.values())
    return total, total - seen.get(t.x.untyped_storage().data_ptr(), 0)


def measure_case(run: Run, case: Case, names: tuple[str, ...] | None, repeats: int, min_sample_s: float,
                 graphs: bool = False) -> list[dict]:
    """Build, check and warm up every contender that can run ``case``, time them side by side, record the rows."""
    spec, backward = case.spec, case.mode == "backward"
    t = make_tensors(spec, backward)
    pool, _ = pick(spec, names)
    expected = float64_expected(t) if spec.dropout == 0 and not spec.slices else None
    steps, contexts = {}, {}
    errors, saved, beyond, peak = {}, {}, {}, {}
    for contender in (c for c in pool if case.mode in c.modes):
        try:
            with contender.active():
                built = contender.build(t)
                step = stepper(built, t, case.mode)
                step()  # the first call: compiles what compiles
                if expected is not None and contender.name not in ("F.linear", "nn.Linear"):
                    errors[contender.name] = rel_err(built, t, expected)
                if backward:
                    saved[contender.name], beyond[contender.name] = saved_bytes(built, t)
                if spec.device == "cuda":
                    for tensor in (*t.xs, *built.grads):
                        tensor.grad = None  # so that "before" holds no grads of earlier calls
                    peak[contender.name] = peak_bytes(lambda built=built: call(built, t, case.mode, 0))
        except Exception as error:  # a broken contender must not stop the others
            print(f"  {contender.name} failed on {case.label}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        steps[contender.name], contexts[contender.name] = step, contender.active
    device, rows = spec.device, len(run.rows)
    samples = side_by_side(steps, repeats, device, min_sample_s=min_sample_s, warmup=0, contexts=contexts)
    run.record_times(case.label, case.params, samples, baseline=BASELINE, device=device)
    if graphs and device == "cuda":
        run.record_times(case.label, case.params, graph_side_by_side(steps, repeats), baseline=BASELINE,
                         device=device, metric="graph time")
    for metric, values in (("saved", saved), ("saved beyond x", beyond), ("peak", peak)):
        if values:
            run.record_group(case.label, case.params, metric, "MiB", {k: v / MIB for k, v in values.items()},
                             baseline=BASELINE, device=device)
    if errors:
        run.record_group(case.label, case.params, "rel err", "", errors, device=device)
    return run.rows[rows:]


def main(argv: list[str] | None = None) -> Run:
    argv = sys.argv[1:] if argv is None else argv
    parser = arguments(__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group()
    for name, text in (("quick", "a small selection, < 3 min on 2 CPU cores (default)"),
                       ("full", "the whole grid of shapes, tokens, ranks, dropouts and dtypes"),
                       ("reference-vs-unfused", "the reference backend vs unfused on GPT-2 Medium shapes (CPU)"),
                       ("gpu", "bf16 GPT-2 Medium/Large shapes: triton vs cuBLAS and unfused, eager and graphs"),
                       ("smoke", "every contender on a tiny case, seconds")):
        which.add_argument(f"--{name}", dest="suite", action="store_const", const=name, help=text)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contenders", help="comma-separated names to run (default: the suite's)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default per suite)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before running (default: torch's)")
    args = parser.parse_args(argv)
    suite_name = args.suite or "quick"
    device = "cpu" if suite_name == "reference-vs-unfused" else args.device
    if suite_name == "gpu" and device != "cuda":
        parser.error("--gpu needs a CUDA device")
    suite = make_suite(suite_name, device)
    names = tuple(args.contenders.split(",")) if args.contenders else suite.contenders
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run("layer", __file__, argv, args.csv)
    print(run.describe(device), flush=True)
    _, missing = pick(suite.cases[0].spec, names)
    for name, reason in missing.items():
        print(f"not measured: {name}: {reason}")
    for i, case in enumerate(suite.cases, 1):
        print(f"[{i}/{len(suite.cases)}] {case.label}", file=sys.stderr, flush=True)
        rows = measure_case(run, case, names, args.repeats or suite.repeats, suite.min_sample_s, suite.graphs)
        print(table(rows), flush=True)
    if device == "cuda" and fastlora.backends()["triton"].available:
        print("autotuned configs:", json.dumps(internals.tuned_configs()))
    print(f"{len(run.rows)} rows appended to {args.csv}")
    return run


if __name__ == "__main__":
    main()
