"""Triton-backend specifics: in-kernel dropout masks bit for bit, partial gradients, strided operands, import gate."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import TOLERANCE, rel_err

from fastlora.ops import reference
from fastlora.ops.reference import dropout_keep_mask

triton_backend = pytest.importorskip("fastlora.ops.triton", reason="triton backend unavailable here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = [0, 12345, (7 << 32) + 99, 2**62 - 1, -3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_forward_kernel_mask_is_bit_identical_to_reference(seed, p):
    """With A = I and x = 1 the forward's low-rank input is exactly the keep-mask over 1-p."""
    rows, cols = 70, 80  # neither a multiple of any block size
    x = torch.ones(rows, cols, device=DEVICE)
    drop = triton_backend._dropout_args(p, torch.tensor(seed))
    h = triton_backend._lora_down(x, torch.eye(cols, device=DEVICE), drop)
    keep = dropout_keep_mask(torch.tensor(seed), rows, cols, p, torch.device(DEVICE))
    assert torch.equal(h[:, :cols] != 0, keep)
    assert torch.all(h[:, :cols][keep] == torch.tensor(1 / (1 - p), dtype=torch.float32))


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_dx_kernel_mask_is_bit_identical_to_reference(seed):
    """With W = 0 the dx GEMM's output is its masked rank-R term alone: its support is the mask."""
    rows, n_in, n_out, p = 45, 72, 24, 0.3
    dy, lora_A, lora_B = (torch.ones(*shape, device=DEVICE) for shape in ((rows, n_out), (3, n_in), (n_out, 3)))
    x, weight = torch.randn(rows, n_in, device=DEVICE), torch.zeros(n_out, n_in, device=DEVICE)
    dx, _, _ = triton_backend.backward(dy, x, weight, lora_A, lora_B, 1.0, p, torch.tensor(seed), (True, False, False))
    keep = dropout_keep_mask(torch.tensor(seed), rows, n_in, p, torch.device(DEVICE))
    assert torch.equal(dx != 0, keep)
    assert torch.all(dx[keep] == torch.tensor(3 * n_out / (1 - p), dtype=torch.float32))


def _operands(rows, n_in, n_out, rank, dtype):
    """Strided x (every other column), a Conv1D-style transposed weight view, and a rank-`rank` adapter."""
    gen = torch.Generator().manual_seed(rows * 1000 + rank)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)

    x = rand(rows, 2 * n_in)[:, ::2]
    weight = rand(n_in, n_out, scale=n_in**-0.5).t()
    return x, weight, rand(n_out), rand(rank, n_in, scale=n_in**-0.5), rand(n_out, rank, scale=rank**-0.5)


NEEDS = [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_computes_only_what_is_needed(needs, dtype):
    x, weight, _, lora_A, lora_B = _operands(45, 40, 56, 5, dtype)
    assert not x.is_contiguous() and not weight.is_contiguous()
    grad_out = torch.randn(45, 56, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    args = (grad_out, x, weight, lora_A, lora_B, 1.5, 0.2, torch.tensor(77), needs)
    got = triton_backend.backward(*args)
    expected = reference.backward(grad_out.double(), x.double(), weight.double(), lora_A.double(), lora_B.double(),
                                  *args[5:])
    for name, need, g, e in zip(("dx", "dA", "dB"), needs, got, expected, strict=True):
        assert (g is None) == (not need), name
        if need:
            assert g.dtype == dtype and g.shape == e.shape, name
            assert rel_err(g, e) <= TOLERANCE[dtype], f"{name} error {rel_err(g, e):.2e}"


@pytest.mark.parametrize("rows", [1, 33, 130])
def test_forward_with_strided_operands_and_large_rank(rows):
    """Non-contiguous x and weight, M off every block size, rank above the 16-wide padding."""
    x, weight, bias, lora_A, lora_B = _operands(rows, 48, 40, 20, torch.float32)
    seed = torch.tensor(5)
    got = triton_backend.forward(x, weight, bias, lora_A, lora_B, 0.7, 0.1, seed)
    expected = reference.forward(x.double(), weight.double(), bias.double(), lora_A.double(), lora_B.double(),
                                 0.7, 0.1, seed)
    assert rel_err(got, expected) <= TOLERANCE[torch.float32]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gate only refuses machines without CUDA")
def test_import_without_cuda_or_interpreter_says_why():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import fastlora.ops.triton"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError: the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1" in result.stderr
