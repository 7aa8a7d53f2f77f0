"""DoRA: fastlora's DoRA op against peft's DoRA layer and fastlora's LoRA op, time and peak memory, CPU or GPU.

Run: ``python benchmarks/bench_dora.py [--threads 2] [--repeats 9] [--rows 512] [--shape 1024 4096] [--rank 16]
[--no-peak] [--smoke]``: fp32 on the CPU, its default backend (cpu). ``--gpu``: bf16 on the GPU (the triton
backend), 16384 tokens, 4096->4096 and 4096->14336 (``--shape`` picks one), peak memory from the CUDA allocator's
statistics (the most allocated during one step above what was allocated before it). Modes: ``inference`` (forward under
``torch.no_grad()``), ``fwd+bwd p=0`` and ``fwd+bwd p=0.05`` (forward and backward with W and b frozen, gradients
for x, A, B and the magnitude). Contenders:

- ``peft dora``: peft's ``lora.Linear`` with ``use_dora=True`` (the layer peft users run);
- ``fastlora dora``: :func:`fastlora.lora_linear` with ``magnitude=m``;
- ``fastlora lora``: :func:`fastlora.lora_linear` without it, the LoRA layer DoRA adds to.

Times: the contenders of a mode timed side by side (:func:`measure.side_by_side`: warmed up, then interleaved
rounds in one process, the order rotating, medians), a sample one call. The magnitude is the one peft's layer
holds (|W_i|: B is zero when peft sets it), and fastlora's DoRA output is checked against peft's first.

Peak memory (fwd+bwd modes, Linux): each contender in a fresh process whose glibc mmap threshold is 64 KiB, so
that every block of 64 KiB or more is a mapping of its own, returned to the OS when freed, and the resident set
follows the live memory. After a warm-up step there (thread pools and OpenBLAS's buffers exist), the peak resident
set of one more step (VmHWM, reset through ``/proc/self/clear_refs``) above the resident set before it is what the
step adds at its peak: output, gradients, saved tensors and every library's scratch, not the inputs (W, b, A, B, m,
x, dy) that exist before it. ``peak with inputs`` adds those inputs' bytes.

Rows (benchmark ``dora``): ``time`` ms, ``step peak`` and ``peak with inputs`` MiB, each with its ratio to
``fastlora lora``. The printed tables add the speed-up over ``peft dora``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import torch
from contenders import Spec, Tensors, make_tensors, peft_layer
from measure import side_by_side
from runner import Run, arguments

import fastlora

MODES = {"inference": 0.0, "fwd+bwd p=0": 0.0, "fwd+bwd p=0.05": 0.05}
CONTENDERS = ("peft dora", "fastlora dora", "fastlora lora")
BASELINE = "fastlora lora"
SCALE = 2.0
MIB = 2**20


def build(name: str, t: Tensors) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """The contender's call on x and the tensors besides x whose gradients a backward sets."""
    if name == "peft dora":
        built = peft_layer(t, use_dora=True)
        return built.fn, built.grads
    w, b, A, B, p = t.weight, t.bias, t.lora_A, t.lora_B, t.spec.dropout
    if name == "fastlora lora":
        return (lambda x: fastlora.lora_linear(x, w, b, A, B, SCALE, p)), [A, B]
    m = torch.linalg.vector_norm(w, dim=1).requires_grad_()  # peft's layer's: |W_i| (B is zero when peft sets it)
    return (lambda x: fastlora.lora_linear(x, w, b, A, B, SCALE, p, magnitude=m)), [A, B, m]


def stepper(fn: Callable, grads: list[torch.Tensor], t: Tensors, mode: str) -> Callable[[], None]:
    """One forward without grad (inference), or one forward and backward."""
    x = t.x
    if mode == "inference":
        def forward() -> None:
            with torch.no_grad():
                fn(x)
        return forward

    def step() -> None:
        for tensor in (x, *grads):
            tensor.grad = None
        fn(x).backward(t.grads[0])
    return step


def tensors(args, mode: str) -> Tensors:
    n_in, n_out = args.shape
    return make_tensors(Spec(args.rows, n_in, n_out, args.rank, MODES[mode], scale=SCALE, dtype=args.dtype,
                             device=args.device))


def cuda_peak(step: Callable[[], None]) -> int:
    """Bytes the CUDA allocator held at most during one step (after a warm-up one) above what it held before."""
    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def check_against_peft(args) -> float:
    """The relative error of fastlora's DoRA output against peft's (no dropout); an error above 1e-5 stops the run."""
    t = tensors(args, "inference")
    with torch.no_grad():
        want, got = build("peft dora", t)[0](t.x), build("fastlora dora", t)[0](t.x)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    bound = 1e-5 if args.dtype == "float32" else 2e-2
    assert err < bound, f"fastlora's DoRA differs from peft's: relative error {err:.1e}"
    return err


# ---------------------------------------------------------------- peak memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_child(args) -> None:
    """In a fresh process (see the module's docstring): print the step's peak above its start, and the inputs' bytes."""
    torch.set_num_threads(args.threads)
    t = tensors(args, args.mode)
    fn, grads = build(args.peak, t)
    step = stepper(fn, grads, t, args.mode)
    step()  # warm-up: pools and buffers that persist
    for tensor in (t.x, *grads):
        tensor.grad = None
    inputs = {t.weight, t.bias, t.x, t.grads[0], *grads}
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"step": (peak - before) * 1024, "inputs": sum(x.numel() * x.element_size() for x in inputs)}))


def peak_bytes(args, name: str, mode: str) -> dict[str, int]:
    """:func:`peak_child` of contender ``name`` in ``mode``, run in a fresh process."""
    command = [sys.executable, __file__, "--peak", name, "--mode", mode, "--threads", str(args.threads),
               "--rows", str(args.rows), "--shape", *map(str, args.shape), "--rank", str(args.rank)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run


def ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base else "n/a"


def main(argv: list[str] | None = None) -> Run | None:
    argv = sys.argv[1:] if argv is None else argv
    parser = arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds per mode")
    parser.add_argument("--rows", type=int, help="tokens (default 512; 16384 with --gpu)")
    parser.add_argument("--shape", type=int, nargs=2, metavar=("IN", "OUT"),
                        help="one layer shape (default 1024 4096; with --gpu 4096 4096 and 4096 14336)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak memory processes")
    parser.add_argument("--smoke", action="store_true", help="seconds: 64 rows, 96 -> 128, rank 4, 2 rounds")
    parser.add_argument("--gpu", action="store_true", help="bf16 on the GPU, 16384 tokens, 4096->4096, 4096->14336")
    parser.add_argument("--peak", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device, args.dtype = ("cuda", "bfloat16") if args.gpu else ("cpu", "float32")
    if args.peak:  # a peak memory process
        peak_child(args)
        return None
    if args.rows is None:
        args.rows = 16384 if args.gpu else 512
    shapes = [tuple(args.shape)] if args.shape else [(4096, 4096), (4096, 14336)] if args.gpu else [(1024, 4096)]
    if args.smoke:
        args.rows, shapes, args.rank, args.repeats = 64, [(96, 128)], 4, 2
    torch.set_num_threads(args.threads)
    run = Run("dora", __file__, argv, args.csv)
    print(run.describe(args.device) + "\n")
    for shape in shapes:
        args.shape = list(shape)
        measure_shape(args, run)
    print(f"\n{len(run.rows)} rows appended to {args.csv}")
    return run


def measure_shape(args, run: Run) -> None:
    """Every mode's times, and (unless ``--no-peak``) the fwd+bwd modes' peak memory, for one layer shape."""
    print(f"fastlora's DoRA output against peft's: relative error {check_against_peft(args):.1e}\n")
    n_in, n_out = args.shape
    label = f"{n_in}->{n_out} M={args.rows} r={args.rank}"
    print("| mode | peft dora ms | fastlora dora ms | fastlora lora ms | dora / lora | speed-up over peft |")
    print("|---|--:|--:|--:|--:|--:|")
    peaks = {}
    for mode, p in MODES.items():
        params = {"rows": args.rows, "in_features": n_in, "out_features": n_out, "rank": args.rank, "dropout": p,
                  "mode": mode, "dtype": args.dtype, "device": args.device}
        t = tensors(args, mode)
        fns = {name: stepper(*build(name, t), t, mode) for name in CONTENDERS}
        samples = side_by_side(fns, args.repeats, args.device, calls=None if args.gpu else 1, warmup=2)
        ms = {name: s * 1e3 for name, s in run.record_times(f"{label} {mode}", params, samples,
                                                            baseline=BASELINE).items()}
        print(f"| {mode} | {ms['peft dora']:.1f} | {ms['fastlora dora']:.1f} | {ms['fastlora lora']:.1f} | "
              f"{ms['fastlora dora'] / ms['fastlora lora']:.3f} | {ms['peft dora'] / ms['fastlora dora']:.2f} |",
              flush=True)
        if args.gpu and mode != "inference" and not args.no_peak:
            values = {name: cuda_peak(fn) / MIB for name, fn in fns.items()}
            run.record_group(f"{label} {mode}", params, "step peak", "MiB", values, baseline=BASELINE)
            print("  step peak MiB: " + ", ".join(f"{name} {v:.0f}" for name, v in values.items()), flush=True)
        elif mode != "inference" and not args.no_peak and sys.platform.startswith("linux") \
                and not (args.smoke and p > 0):
            found = {name: peak_bytes(args, name, mode) for name in CONTENDERS}
            peaks[mode] = found
            for metric, key in (("step peak", "step"), ("peak with inputs", None)):
                values = {name: (b["step"] + (0 if key else b["inputs"])) / MIB for name, b in found.items()}
                run.record_group(f"{label} {mode}", params, metric, "MiB", values, baseline=BASELINE)
    if peaks:
        print("\n| mode | contender | step peak MiB | ÷ lora | peak with inputs MiB | ÷ lora |")
        print("|---|---|--:|--:|--:|--:|")
        for mode, found in peaks.items():
            lora = found[BASELINE]
            for name, b in found.items():
                total, lora_total = b["step"] + b["inputs"], lora["step"] + lora["inputs"]
                print(f"| {mode} | {name} | {b['step'] / MIB:.2f} | {ratio(b['step'], lora['step'])} | "
                      f"{total / MIB:.2f} | {ratio(total, lora_total)} |")


if __name__ == "__main__":
    main()
