"""The one benchmark command: layer contenders, the GPT-2 training step, tables, JSON, Markdown, charts.

    python benchmarks/run.py --quick                  # < 3 min on 2 CPU cores; the default
    python benchmarks/run.py --full                   # the whole grid (hours on CPU)
    python benchmarks/run.py --reference-vs-unfused   # issue 2's check: reference backend vs peft-style eager
    python benchmarks/run.py --smoke                  # seconds: every contender on a tiny case

It runs on CUDA when a GPU is present (``--device cpu`` to force the CPU) and writes
``benchmarks/results/<date>_<device>_<suite>.{json,md,png}``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import torch
from harness import MODES, Case, Result, contenders, measure, ratios
from plot import plot_speedup
from tqdm import tqdm
from train_step import StepCase, StepResult, measure_step, overhead_over_floor

import fastlora

RESULTS = Path(__file__).resolve().parent / "results"
ALL_SHAPES = ((768, 2304), (768, 768), (1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024),
              (1280, 3840), (1280, 5120), (5120, 1280))
QUICK_SHAPES = ((768, 2304), (1024, 4096), (4096, 1024))
MEDIUM_SHAPES = ((1024, 3072), (1024, 4096), (4096, 1024))
ALL_TOKENS = (1, 8, 128, 512, 2048, 8192)
CPU_MAX_TOKENS = 2048


@dataclass
class Suite:
    """What one run measures and how hard it tries."""

    name: str
    cases: list[Case]
    steps: list[StepCase] = field(default_factory=list)
    repeats: int = 5
    min_sample_s: float = 0.02
    step_warmup: int = 2
    step_repeats: int = 5
    contenders: tuple[str, ...] | None = None  # None: every available contender


def _dtypes(device: str) -> tuple[str, ...]:
    return ("bfloat16", "float16") if device == "cuda" else ("float32",)


def _grid(device: str, shapes, tokens, ranks, dropouts, dtypes=None, modes=MODES) -> list[Case]:
    return [Case(i, o, m, r, p, mode, dtype, device)
            for (i, o), m, r, p, dtype, mode in itertools.product(
                shapes, tokens, ranks, dropouts, dtypes or _dtypes(device), modes)]


def make_suite(name: str, device: str) -> Suite:
    """The named suite for ``device``."""
    gpu = device == "cuda"
    if name == "smoke":
        return Suite(name, _grid(device, ((64, 96),), (16,), (4,), (0.0, 0.1), _dtypes(device)[:1]),
                     [StepCase("small", 1, 16, n_layer=1, device=device)], repeats=2, min_sample_s=0.001, step_warmup=1,
                     step_repeats=2)
    if name == "quick":
        tokens = (512, 8192) if gpu else (8, 512)
        # GPU: Small only, so that the quick suite fits gpu_check.sh's slot (Medium: --train-step)
        steps = ([StepCase("small", 8, 512, device=device, autocast="bfloat16")] if gpu
                 else [StepCase("small", 1, 64, n_layer=2, device=device)])
        return Suite(name, _grid(device, QUICK_SHAPES, tokens, (16,), (0.1,), _dtypes(device)[:1]), steps,
                     repeats=7, min_sample_s=0.02, step_warmup=2 if gpu else 1, step_repeats=5 if gpu else 15)
    if name == "full":
        tokens = ALL_TOKENS if gpu else tuple(m for m in ALL_TOKENS if m <= CPU_MAX_TOKENS)
        batch = 8 if gpu else 2
        steps = [StepCase(size, batch, 512 if gpu else 256, device=device, autocast="bfloat16" if gpu else None)
                 for size in ("small", "medium")]
        return Suite(name, _grid(device, ALL_SHAPES, tokens, (4, 16, 64), (0.0, 0.1)), steps,
                     repeats=9, min_sample_s=0.05, step_repeats=9)
    if name == "train-step":  # issue 4's end-to-end target: a full-depth GPT-2 Small step, nothing else
        steps = ([StepCase("small", 8, 512, device=device, autocast="bfloat16"),
                  StepCase("medium", 4, 512, device=device, autocast="bfloat16")] if gpu
                 else [StepCase("small", 2, 256, device=device)])
        return Suite(name, [], steps, step_warmup=2, step_repeats=9)
    if name == "reference-vs-unfused":
        cases = _grid("cpu", MEDIUM_SHAPES, (2048,), (4, 16), (0.1,), ("float32",), ("backward",))
        return Suite(name, cases, repeats=9, min_sample_s=0.2,
                     contenders=("fastlora-reference", "unfused", "plain"))
    raise ValueError(f"unknown suite {name!r}")


# ---------------------------------------------------------------- describing the machine


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): other work on the machine."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _checkout() -> str | None:
    """The measured checkout's commit (``-dirty`` with uncommitted changes), or None outside git."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def describe(device: str, suite: str, argv: list[str]) -> dict:
    """Everything a reader needs to know about the run: machine, versions, backends, threads, date."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = device_name(device)
    threads = torch.get_num_threads()
    tag = f"{device}-{_slug(name)}" + (f"-{threads}t" if device == "cpu" else "")
    return {
        "suite": suite,
        "command": "python benchmarks/run.py " + " ".join(argv),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "device_name": name,
        "device_tag": tag,
        "threads": threads,
        "load_average_at_start": _load_average(),
        "torch": torch.__version__,
        "fastlora": fastlora.__version__,
        "commit": _checkout(),
        "python": platform.python_version(),
        "title": f"fastlora {suite} benchmark — {name} ({device}, threads={threads}) — {now:%Y-%m-%d}",
        "stem": f"{now:%Y-%m-%d}_{tag}_{suite}",
    }


# ---------------------------------------------------------------- running


def _fmt_bytes(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.3g}"


def _layer_rows(results: list[Result]) -> list[dict]:
    ratio = ratios(results)
    rows = []
    for result in results:
        row = result.to_dict()
        row.update(ratio.get(result.contender, {"speedup_vs_unfused": math.nan, "overhead_vs_plain": math.nan}))
        rows.append(row)
    return rows


def layer_table(rows: list[dict], markdown: bool = False) -> str:
    """One line per contender per case: median, spread, ratios, memory."""
    head = ["case", "mode", "contender", "median ms", "spread", "speedup vs unfused", "overhead vs plain",
            "saved MiB", "saved MiB beyond x", "peak MiB", "rel err"]
    lines = []
    for r in rows:
        case = Case(**r["case"])
        if r["status"] != "ok":
            lines.append([case.label, case.mode, r["contender"], "—", "", "", "", "", "", "", r["reason"][:80]])
            continue
        lines.append([case.label, case.mode, r["contender"], f"{r['median_s'] * 1e3:.3f}", f"±{r['spread']:.0%}",
                      f"{r['speedup_vs_unfused']:.2f}x", f"{r['overhead_vs_plain']:+.0%}",
                      _fmt_bytes(r["saved_bytes"]), _fmt_bytes(r["saved_bytes_beyond_input"]),
                      _fmt_bytes(r["peak_bytes"]), "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"])
    return _table(head, lines, markdown)


def speedup_table(rows: list[dict], mode: str) -> str:
    """Markdown: one row per case, one column per contender, cells = speedup vs unfused."""
    rows = [r for r in rows if r["case"]["mode"] == mode and r["status"] == "ok"]
    names = list(dict.fromkeys(r["contender"] for r in rows))
    cells: dict[str, dict[str, str]] = {}
    for r in rows:
        cells.setdefault(Case(**r["case"]).label, {})[r["contender"]] = f"{r['speedup_vs_unfused']:.2f}x"
    lines = [[label, *(named.get(n, "") for n in names)] for label, named in cells.items()]
    return _table(["case", *names], lines, markdown=True)


def step_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["model", "variant", "median s/step", "spread", "tokens/s", "overhead vs floor", "trainable",
            "saved MiB", "peak MiB"]
    lines = []
    for r in rows:
        case = StepCase(**r["case"])
        if r["status"] != "ok":
            lines.append([case.label, r["variant"], "—", "", "", "", "", "", r["reason"][:80]])
            continue
        lines.append([case.label, r["variant"], f"{r['median_s']:.3f}", f"±{r['spread']:.0%}",
                      f"{r['tokens_per_s']:.0f}", f"{r['overhead_vs_floor']:+.1%}", f"{r['trainable']:,}",
                      _fmt_bytes(r["saved_bytes"]), _fmt_bytes(r["peak_bytes"])])
    return _table(head, lines, markdown)


def _table(head: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        rows = [head, ["---"] * len(head), *lines]
        return "\n".join("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows)
    widths = [max(len(str(row[k])) for row in [head, *lines]) for k in range(len(head))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in [head, *lines])


def _step_rows(results: list[StepResult]) -> list[dict]:
    overhead = overhead_over_floor(results)
    rows = []
    for result in results:
        row = result.to_dict()
        row["overhead_vs_floor"] = overhead.get(result.variant, math.nan)
        rows.append(row)
    return rows


def reference_vs_unfused(rows: list[dict]) -> list[dict]:
    """Issue 2's figures per case: the reference backend's time and saved bytes relative to ``unfused``."""
    out = []
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            by_case.setdefault(Case(**r["case"]).label, {})[r["contender"]] = r
    for label, named in by_case.items():
        ref, unf = named.get("fastlora-reference"), named.get("unfused")
        if ref is None or unf is None:
            continue
        out.append({
            "case": label,
            "time_ratio": ref["median_s"] / unf["median_s"],
            "reference_ms": ref["median_s"] * 1e3, "reference_spread": ref["spread"],
            "unfused_ms": unf["median_s"] * 1e3, "unfused_spread": unf["spread"],
            "saved_ratio": ref["saved_bytes"] / unf["saved_bytes"],
            "saved_beyond_x_ratio": ref["saved_bytes_beyond_input"] / unf["saved_bytes_beyond_input"],
            "reference_saved_bytes": ref["saved_bytes"], "unfused_saved_bytes": unf["saved_bytes"],
            "reference_saved_beyond_x": ref["saved_bytes_beyond_input"],
            "unfused_saved_beyond_x": unf["saved_bytes_beyond_input"],
        })
    return out


def comparison_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["case", "reference ms", "unfused ms", "time ref/unfused", "saved MiB ref / unfused", "saved ratio",
            "beyond-x MiB ref / unfused", "beyond-x ratio"]
    lines = [[r["case"], f"{r['reference_ms']:.1f} ±{r['reference_spread']:.0%}",
              f"{r['unfused_ms']:.1f} ±{r['unfused_spread']:.0%}", f"{r['time_ratio']:.2f}",
              f"{_fmt_bytes(r['reference_saved_bytes'])} / {_fmt_bytes(r['unfused_saved_bytes'])}",
              f"{r['saved_ratio']:.3f}",
              f"{_fmt_bytes(r['reference_saved_beyond_x'])} / {_fmt_bytes(r['unfused_saved_beyond_x'])}",
              f"{r['saved_beyond_x_ratio']:.1e}"] for r in rows]
    return _table(head, lines, markdown)


def run_suite(suite: Suite, device: str, progress: bool = True) -> tuple[list[dict], list[dict], dict[str, str]]:
    """Measure every case of ``suite``; return (layer rows, step rows, unavailable contenders)."""
    pool, missing = contenders(device)
    if suite.contenders is not None:
        pool = [c for c in pool if c.name in suite.contenders]
        missing = {k: v for k, v in missing.items() if k in suite.contenders}
    layer_rows: list[dict] = []
    bar = tqdm(suite.cases, desc="layer", disable=not progress, file=sys.stderr)
    for case in bar:
        bar.set_postfix_str(f"{case.label} {case.mode}")
        rows = _layer_rows(measure(case, pool, suite.repeats, suite.min_sample_s))
        layer_rows += rows
        if progress:
            tqdm.write(layer_table(rows) + "\n", file=sys.stderr)
    step_rows: list[dict] = []
    for step in tqdm(suite.steps, desc="training step", disable=not progress, file=sys.stderr):
        rows = _step_rows(measure_step(step, repeats=suite.step_repeats, warmup=suite.step_warmup))
        step_rows += rows
        if progress:
            tqdm.write(step_table(rows) + "\n", file=sys.stderr)
    return layer_rows, step_rows, missing


# ---------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    meta = report["meta"]
    parts = [
        f"# {meta['title']}", "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['device_name']} ({meta['device']}), torch threads={meta['threads']}; "
        f"torch {meta['torch']}, fastlora {meta['fastlora']} (commit {meta.get('commit')}), Python {meta['python']}",
        f"- date: {meta['date']}; load average (1/5/15 min) at start {meta['load_average_at_start']}, "
        f"at end {meta.get('load_average_at_end')}",
        "- method: warm-up, then interleaved rounds of all contenders (order rotated each round); "
        "median per call, spread = half the interquartile range over the median",
    ]
    for name, reason in report["unavailable"].items():
        parts.append(f"- not measured: `{name}`: {reason}")
    if report["reference_vs_unfused"]:
        parts += ["", "## Reference backend vs unfused (fp32 CPU, forward + backward)", "",
                  comparison_table(report["reference_vs_unfused"], markdown=True)]
    if report["layer"]:
        for mode, title in (("forward", "forward (no grad)"), ("backward", "forward + backward")):
            if any(r["case"]["mode"] == mode for r in report["layer"]):
                parts += ["", f"## Speedup vs unfused, {title}", "", speedup_table(report["layer"], mode)]
        if report.get("chart"):
            parts += ["", f"![speedup vs unfused]({report['chart']})"]
        parts += ["", "## Layer, all figures", "", layer_table(report["layer"], markdown=True)]
    if report["train_step"]:
        parts += ["", "## GPT-2 training step (LoRA r=4, alpha=32, dropout 0.1 on q,v of c_attn)", "",
                  step_table(report["train_step"], markdown=True)]
    parts += ["", "Columns: *speedup vs unfused* = unfused median / contender median (higher is faster); "
              "*overhead vs plain* = contender median / plain `F.linear` median - 1; *saved MiB* = activations "
              "saved for backward (parameters excluded, storages counted once); *beyond x* leaves out the layer "
              "input itself; *peak MiB* = CUDA peak above the allocation before the call; *rel err* = relative "
              "Frobenius error against float64 (dropout 0 only).", ""]
    return "\n".join(parts)


def console(report: dict) -> str:
    """The plain-text tables printed at the end of a run."""
    parts = []
    if report["reference_vs_unfused"]:
        parts += ["reference backend vs unfused:", comparison_table(report["reference_vs_unfused"]), ""]
    if report["layer"]:
        parts += ["layer:", layer_table(report["layer"]), ""]
    if report["train_step"]:
        parts += ["GPT-2 training step:", step_table(report["train_step"]), ""]
    return "\n".join(parts)


def _json_safe(value):
    """``value`` with NaN and infinities replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_outputs(report: dict, out_dir: Path, plot: bool = True) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (when there are layer results) ``<stem>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report["meta"]["stem"]
    written = []
    chart = plot_speedup(report["layer"], out_dir / f"{stem}.png", report["meta"]["title"]) \
        if report["layer"] and plot else None
    report["chart"] = chart.name if chart else None
    if chart:
        written.append(chart)
    (out_dir / f"{stem}.json").write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(report))
    return [*written, out_dir / f"{stem}.json", out_dir / f"{stem}.md"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group()
    for name, text in (("quick", "a small selection, < 3 min on 2 CPU cores (default)"),
                       ("full", "the whole grid of shapes, tokens, ranks, dropouts and dtypes"),
                       ("reference-vs-unfused", "issue 2: reference backend vs unfused on GPT-2 Medium shapes"),
                       ("train-step", "only the GPT-2 training step, full depth (CPU: Small; GPU: Small, Medium)"),
                       ("smoke", "every contender on a tiny case, seconds")):
        which.add_argument(f"--{name}", dest="suite", action="store_const", const=name, help=text)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-train-step", action="store_true", help="skip the GPT-2 training-step benchmark")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default per suite)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before running (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.suite = args.suite or "quick"
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = "cpu" if args.suite == "reference-vs-unfused" else args.device
    suite = make_suite(args.suite, device)
    if args.repeats:
        suite.repeats = suite.step_repeats = args.repeats
    if args.no_train_step:
        suite.steps = []
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = describe(device, suite.name, argv)
    print(f"{meta['title']}\n{meta['command']}\ntorch threads: {meta['threads']}; "
          f"load average {meta['load_average_at_start']}; "
          f"{len(suite.cases)} layer cases, {len(suite.steps)} training-step cases", file=sys.stderr)
    layer, steps, missing = run_suite(suite, device)
    meta["load_average_at_end"] = _load_average()
    report = {"meta": meta, "unavailable": missing, "layer": layer, "train_step": steps,
              "reference_vs_unfused": reference_vs_unfused(layer) if suite.name == "reference-vs-unfused" else []}
    written = write_outputs(report, args.out, plot=not args.no_plot)
    print(console(report))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
