"""FSDP2 and DDP with two gloo processes on the CPU train exactly as one process does, with every backend,
and the cpu backend leaves the parameters' storages resizable (FSDP frees gathered parameters by resizing)."""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastlora

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("distributed_train.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CPU_AVAILABLE = fastlora.backends()["cpu"].available
needs_cpu_backend = pytest.mark.skipif(not CPU_AVAILABLE, reason="the cpu backend is unavailable")
needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is unavailable")
BACKENDS = [pytest.param("cpu", marks=needs_cpu_backend), "reference"]


def train(mode: str, backend: str, out: Path) -> dict:
    """distributed_train.py in ``mode`` (two processes under torchrun unless ``single``), forcing ``backend``;
    what it saved, after checking that every rank printed the final loss."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "FASTLORA_BACKEND": backend}
    launcher = [sys.executable] if mode == "single" else TORCHRUN
    result = subprocess.run([*launcher, str(SCRIPT), "--mode", mode, "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{mode} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    saved = torch.load(out)
    finals = sorted(re.findall(r"^final rank=(\d+) loss=(\S+)$", result.stdout, re.MULTILINE))
    assert finals == [(str(r), repr(saved["losses"][-1])) for r in range(1 if mode == "single" else 2)], finals
    assert saved["backend"] == backend
    return saved


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process run of a backend (made once per module): the result the parallel runs must give."""
    runs = {}

    def run(backend: str) -> dict:
        if backend not in runs:
            runs[backend] = train("single", backend, tmp_path_factory.mktemp(f"single-{backend}") / "result.pt")
        return runs[backend]
    return run


def assert_trains_as_one_process(got: dict, want: dict) -> None:
    """Same losses and adapter weights as the single-process run, and a loss that falls.

    Both runs do the same arithmetic: each rank's micro-batch goes through the same kernels with
    the same weights (FSDP's all-gather copies them exactly) and the same dropout seeds, and the
    average of two gradients, (g0 + g1) / 2, equals the accumulated g0 / 2 + g1 / 2 exactly. On the
    AMD development machines they agree bit for bit. The tolerance only admits rounding that depends
    on memory alignment (MKL's GEMM, which the cpu backend uses on Intel CPUs, may round differently
    when FSDP's gathered weights sit at other offsets): ~1e-7 relative per op, and SGD keeps weight
    differences proportional to gradient ones. The errors it must catch are far larger: gradients
    summed instead of averaged move the last loss by ~1e-2 (relative) and the adapters by ~1e-1,
    other dropout masks by ~1e-3 and ~2e-2 (adapter entries are at most ~0.2).
    """
    losses = got["losses"]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses == pytest.approx(want["losses"], rel=1e-5, abs=0)
    assert got["adapter"].keys() == want["adapter"].keys() and len(want["adapter"]) == 16  # 2 blocks x 4 linears
    for name, weight in want["adapter"].items():
        torch.testing.assert_close(got["adapter"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


@needs_gloo
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_two_processes_train_as_one_process(backend, one_process, tmp_path):
    """fully_shard on each block and the model; LoRA (dropout 0.1) on every linear."""
    assert_trains_as_one_process(train("fsdp", backend, tmp_path / "fsdp.pt"), one_process(backend))


@needs_gloo
@needs_cpu_backend
def test_ddp_two_processes_train_as_one_process_with_the_cpu_backend(one_process, tmp_path):
    assert_trains_as_one_process(train("ddp", "cpu", tmp_path / "ddp.pt"), one_process("cpu"))


@needs_cpu_backend
@pytest.mark.parametrize("rows", [3, 40], ids=["streamed", "gemm"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_cpu_backend_leaves_weight_and_lora_storages_resizable(rows, conv1d, monkeypatch):
    """The regression: a numpy view (Tensor.numpy()) marks a storage non-resizable for good, and FSDP's
    ``free_unsharded_param`` then fails with "Trying to resize storage that is not resizable"."""
    from transformers.pytorch_utils import Conv1D

    from fastlora.ops import cpu

    monkeypatch.setenv("FASTLORA_BACKEND", "cpu")
    before = cpu.gemm()
    layer = fastlora.LoRALinear(Conv1D(24, 16) if conv1d else nn.Linear(16, 24), r=4, alpha=8, dropout=0.1)
    x = torch.randn(rows, 16, requires_grad=True)
    try:
        for gemm in cpu.GEMMS:
            cpu.set_gemm(gemm)
            layer(x).sum().backward()
    finally:
        cpu.set_gemm(before)
    assert layer.lora_A.grad is not None and x.grad is not None
    for name in ("base_layer.weight", "base_layer.bias", "lora_A", "lora_B"):
        storage = layer.get_parameter(name).untyped_storage()
        storage.resize_(0)  # what FSDP does to free an unsharded parameter
        assert storage.nbytes() == 0, name
