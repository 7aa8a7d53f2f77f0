"""The one benchmark runner: every benchmark appends its measurements as rows to one CSV, each saying what ran where.

A row is one number: a benchmark's case (its label and parameters as JSON), a contender, a metric, the value and
its unit, and where it came from: the run (one process), the device (the CPU's model or the GPU's name), the
commit measured (``-dirty`` with uncommitted changes), the versions of torch, triton, fastlora and peft, threads,
load average, the UTC date and the command line. ``ratio`` is the value over the ``baseline`` contender's value
of the same metric and case, both measured side by side in this run (:func:`measure.side_by_side`): a ratio is
never formed across processes. ``benchmarks/plot.py`` draws a run from the CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
from pathlib import Path

import torch
from measure import median, spread

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "all.csv"
COLUMNS = ("run", "date", "benchmark", "case", "contender", "metric", "value", "unit", "spread", "rounds",
           "baseline", "ratio", "params", "device", "threads", "load", "commit", "torch", "triton", "fastlora",
           "peft", "command")
SECONDS_IN = {"s": 1.0, "ms": 1e3, "us": 1e6}


def arguments(description: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser, with the options every benchmark has."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--csv", type=Path, default=CSV, help="append the rows to this CSV "
                        "(default benchmarks/results/all.csv)")
    return parser


# ---------------------------------------------------------------- describing the run


@functools.cache
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


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): other work on the machine."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def checkout() -> str:
    """The measured checkout's commit, with ``-dirty`` when tracked files outside benchmarks/results differ."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    """The versions of the libraries a row depends on ("" for one not installed)."""
    import fastlora

    found = {"torch": torch.__version__, "fastlora": fastlora.__version__}
    for name in ("triton", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = ""
    return found


# ---------------------------------------------------------------- recording


class Run:
    """One benchmark process: what it is and where it runs, and the rows it appends to the CSV as it measures
    (a run cut short keeps what it measured). ``csv_path=None`` keeps the rows in memory only."""

    def __init__(self, benchmark: str, script: str, argv: list[str], csv_path: Path | None = CSV) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        with contextlib.suppress(ValueError):  # a script outside the checkout keeps its path
            script = str(Path(script).resolve().relative_to(ROOT))
        self.benchmark, self.csv = benchmark, csv_path
        self.meta = {"run": f"{now:%Y%m%dT%H%M%SZ}-{os.getpid()}", "date": now.isoformat(timespec="seconds"),
                     "commit": checkout(), **versions(), "command": shlex.join(["python", script, *argv])}
        self.rows: list[dict] = []
        self._header_checked = False

    def describe(self, device: str) -> str:
        """What runs where, and the command: the top of a benchmark's output."""
        m = self.meta
        return (f"{self.benchmark} on {device_name(device)}: commit {m['commit']}, torch {m['torch']}, triton "
                f"{m['triton'] or '-'}, peft {m['peft'] or '-'}, {torch.get_num_threads()} threads, load "
                f"{load_average()}, {m['date']}\n{m['command']}")

    def record(self, case: str, params: dict, contender: str, metric: str, value: float | None, unit: str, *,
               device: str = "cpu", spread: float | None = None, rounds: int | None = None,
               baseline: str | None = None, ratio: float | None = None) -> dict:
        """Append one row (see the module's docstring for the columns)."""
        row = {**self.meta, "benchmark": self.benchmark, "case": case, "contender": contender, "metric": metric,
               "value": value, "unit": unit, "spread": spread, "rounds": rounds, "baseline": baseline,
               "ratio": ratio, "params": params, "device": device_name(device), "threads": torch.get_num_threads(),
               "load": load_average()}
        self.rows.append(row)
        if self.csv is not None:
            self._append(row)
        return row

    def record_group(self, case: str, params: dict, metric: str, unit: str, values: dict[str, float | None], *,
                     baseline: str | None = None, device: str = "cpu", spreads: dict[str, float] | None = None,
                     rounds: int | None = None) -> list[dict]:
        """One row per contender for one metric of contenders measured together in this run, each with its ratio
        to ``baseline``'s value (when there is one)."""
        base = values.get(baseline) if baseline else None
        rows = []
        for name, value in values.items():
            ratio = value / base if _finite(value) and _finite(base) and base else None
            rows.append(self.record(case, params, name, metric, value, unit, device=device,
                                    spread=(spreads or {}).get(name), rounds=rounds,
                                    baseline=baseline if ratio is not None else None, ratio=ratio))
        return rows

    def record_times(self, case: str, params: dict, samples: dict[str, list[float]], *, baseline: str | None = None,
                     unit: str = "ms", device: str = "cpu", metric: str = "time") -> dict[str, float]:
        """The median and spread of each contender's samples (seconds per call, from one
        :func:`measure.side_by_side`) in ``unit``, each with its ratio to ``baseline``'s median; returns the
        medians in seconds."""
        medians = {name: median(s) for name, s in samples.items()}
        rounds = max((len(s) for s in samples.values()), default=0)
        self.record_group(case, params, metric, unit, {n: m * SECONDS_IN[unit] for n, m in medians.items()},
                          baseline=baseline, device=device, spreads={n: spread(s) for n, s in samples.items()},
                          rounds=rounds)
        return medians

    def _append(self, row: dict) -> None:
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        new = not self.csv.exists() or self.csv.stat().st_size == 0
        if not new and not self._header_checked:
            with self.csv.open(newline="") as f:
                header = next(csv.reader(f), [])
            if tuple(header) != COLUMNS:
                raise RuntimeError(f"{self.csv} has columns {header}, not {list(COLUMNS)}: write to another file "
                                   "with --csv")
        self._header_checked = True
        with self.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({key: _cell(row[key]) for key in COLUMNS})


def _finite(value: float | None) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _cell(value: object) -> object:
    if isinstance(value, dict):
        return json.dumps(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def read(path: Path = CSV) -> list[dict]:
    """The rows of a results CSV: numbers as numbers (None where empty), params as a dict."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("value", "spread", "rounds", "ratio", "threads", "load"):
            text = row[key]
            row[key] = None if not text else int(text) if text.lstrip("-").isdigit() else float(text)
        row["params"] = json.loads(row["params"]) if row["params"] else {}
    return rows


# ---------------------------------------------------------------- printing


def table(rows: list[dict]) -> str:
    """Markdown tables of ``rows``, one per case: a line per contender, a column per metric (value, ±spread) and,
    where a metric has ratios, one more for the ratio to its baseline."""
    parts = []
    for case in dict.fromkeys(r["case"] for r in rows):
        of_case = [r for r in rows if r["case"] == case]
        metrics = list(dict.fromkeys((r["metric"], r["unit"]) for r in of_case))
        head, columns = ["contender"], []
        for metric, unit in metrics:
            head.append(f"{metric} {unit}".strip())
            columns.append((metric, "value"))
            bases = {r["baseline"] for r in of_case if r["metric"] == metric and r["baseline"]}
            if bases:
                head.append(f"÷ {'/'.join(sorted(bases))}")
                columns.append((metric, "ratio"))
        cells: dict[str, dict] = {}
        for r in of_case:
            cells.setdefault(r["contender"], {})[r["metric"]] = r
        lines = [f"**{case}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, by_metric in cells.items():
            line = [name]
            for metric, what in columns:
                r = by_metric.get(metric)
                line.append("" if r is None else _format(r, what))
            lines.append("| " + " | ".join(line) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _format(row: dict, what: str) -> str:
    if what == "ratio":
        return f"{row['ratio']:.3f}" if _finite(row["ratio"]) else ""
    value = row["value"]
    if not _finite(value):
        return "—"
    text = str(value) if isinstance(value, int) else f"{value:.4g}"
    return text + (f" ±{row['spread']:.0%}" if _finite(row["spread"]) else "")
