"""The persistent TMA GEMMs (fastlora/ops/triton/_hopper.py): their results against a float64 reference, and the
routing that picks them (``FASTLORA_TRITON_GEMM=hopper``) only for 16-bit, TMA-aligned operands on sm_90+.

On CPU the kernel runs under the Triton interpreter (fp16 only: the interpreter does not emulate bf16 dots); on a
GPU without TMA (before sm_90) the tests that need the kernel skip.
"""

import csv
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import TOLERANCE, float64_reference, rel_err

import fastlora
from fastlora.ops import reference

triton_backend = pytest.importorskip("fastlora.ops.triton", reason="triton is unavailable", exc_type=ImportError)
single = triton_backend.single
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
CAPABLE = not GPU or torch.cuda.get_device_capability()[0] >= 9
DTYPES = [torch.float16] + ([torch.bfloat16] if GPU else [])


@pytest.fixture
def launches(monkeypatch) -> list:
    """The hopper route on for the test (restored after), and a list that records each launch of its kernels:
    ``("forward", rows)`` or ``("dx", rows)``."""
    monkeypatch.setattr(single, "GEMM", "hopper")
    calls = []

    def recording(kind: str, launch):
        def recorded(*args):
            calls.append((kind, args[0].shape[0]))
            return launch(*args)
        return recorded
    monkeypatch.setattr(single, "hopper_gemm", recording("forward", single.hopper_gemm))
    monkeypatch.setattr(single, "hopper_dx", recording("dx", single.hopper_dx))
    return calls


def _layer(rows, n_in, n_out, rank, dtype, lora_dtype=None, conv1d=False, seed=0):
    """x, W (nn.Linear's layout or a Conv1D's transposed view), bias, A and B, on the test's device."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, as_dtype=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=as_dtype)

    weight = rand(n_in, n_out, scale=n_in**-0.5).t() if conv1d else rand(n_out, n_in, scale=n_in**-0.5)
    lora_dtype = lora_dtype or dtype
    return (rand(rows, n_in), weight, rand(n_out), rand(rank, n_in, scale=n_in**-0.5, as_dtype=lora_dtype),
            rand(n_out, rank, scale=rank**-0.5, as_dtype=lora_dtype))


def _check(x, weight, bias, lora_A, lora_B, slices=None, p=0.1):
    got, _ = triton_backend.forward(x, weight, bias, lora_A, lora_B, 0.7, p, torch.tensor(11), slices)
    expected, _ = float64_reference(x, weight, bias, lora_A, lora_B, 0.7, p, 11, slices)
    assert got.dtype == x.dtype and got.shape == expected.shape
    assert rel_err(got, expected) <= TOLERANCE[x.dtype]


needs_tma = pytest.mark.skipif(not CAPABLE, reason="the persistent kernel needs TMA and wgmma (sm_90+)")


@needs_tma
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n_in, n_out", [(70, 48, 40), (1, 8, 8), (33, 24, 56)] + [(1100, 64, 72)] * GPU)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [4, 16])
def test_forward_matches_float64_reference(launches, dtype, rows, n_in, n_out, bias, rank):
    """Rows off every tile size and more tiles than programs (the interpreter runs 2), K and N at TMA's limit (8
    16-bit values: 16 bytes), on a GPU a shape of the large-M configs; with and without bias, at ranks below and
    at the 16-wide padding."""
    x, weight, b, lora_A, lora_B = _layer(rows, n_in, n_out, rank, dtype)
    _check(x, weight, b if bias else None, lora_A, lora_B)
    assert launches == [("forward", rows)]


@needs_tma
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_with_qv_slices_and_fp32_lora_over_16_bit(launches, dtype):
    """GPT-2's c_attn setup: three output groups, q and v adapted (the middle group exactly the base layer's),
    fp32 LoRA parameters read as they are; the weight as a Conv1D's transposed view."""
    rows, n_in, n_out, rank = 45, 32, 96, 4
    x, weight, bias, lora_A, lora_B = _layer(rows, n_in, n_out, 2 * rank, dtype, torch.float32, conv1d=True)
    lora_B = lora_B[:2 * n_out // 3, :rank].contiguous()
    slices = (True, False, True)
    _check(x, weight, bias, lora_A, lora_B, slices)
    y, _ = triton_backend.forward(x, weight, bias, lora_A, lora_B, 0.7, 0.1, torch.tensor(11), slices)
    middle = slice(n_out // 3, 2 * n_out // 3)
    base, _ = reference.forward(x.double(), weight.double(), bias.double(), lora_A.double(), lora_B.double() * 0,
                                0.7, 0.0, torch.tensor(0), slices)
    assert rel_err(y[:, middle], base[:, middle]) <= TOLERANCE[dtype]
    assert launches == [("forward", rows)] * 2


@needs_tma
@pytest.mark.parametrize("conv1d", [False, True])
def test_both_weight_layouts_read_through_descriptors(launches, conv1d):
    """nn.Linear's (out, in) rows and a Conv1D weight's (in, out) rows, each through its own descriptor."""
    _check(*_layer(70, 40, 48, 8, torch.float16, conv1d=conv1d))
    assert launches == [("forward", 70)]


def _check_backward(x, weight, bias, lora_A, lora_B, slices=None, p=0.1, needs=(True, True, True), grad=None):
    """Forward and backward of the triton backend against the float64 reference: y, and dx, dA, dB as ``needs``
    asks (dA and dB in the parameters' dtype)."""
    seed = torch.tensor(11)
    y, saved = triton_backend.forward(x, weight, bias, lora_A, lora_B, 0.7, p, seed, slices, needs)
    if grad is None:
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    got = triton_backend.backward(grad, x, weight, lora_A, lora_B, 0.7, p, seed, needs, slices, saved)
    leaves_in = [t.detach().clone().requires_grad_(need) for t, need in zip((x, lora_A, lora_B), needs, strict=True)]
    expected, leaves = float64_reference(leaves_in[0], weight, bias, leaves_in[1], leaves_in[2], 0.7, p, 11, slices)
    expected.backward(grad.double())
    assert rel_err(y, expected) <= TOLERANCE[x.dtype]
    for result, leaf, need, param in zip(got, leaves, needs, (x, lora_A, lora_B), strict=True):
        assert (result is not None) == need
        if need:
            assert result.dtype == param.dtype and result.shape == param.shape
            assert rel_err(result, leaf.grad) <= TOLERANCE[x.dtype]


@needs_tma
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n_in, n_out", [(70, 48, 40), (33, 24, 56)] + [(1100, 64, 72)] * GPU)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("needs", [(True, False, False), (True, True, False), (True, True, True)])
def test_dx_and_da_match_float64_reference(launches, dtype, rows, n_in, n_out, p, needs):
    """The persistent dx kernel, alone or with dA (atomically added), with and without dropout, on rows off every
    tile size and more tiles than programs; dB stays the tiled reduction's."""
    _check_backward(*_layer(rows, n_in, n_out, 4, dtype), p=p, needs=needs)
    assert launches == [("forward", rows), ("dx", rows)]


@needs_tma
@pytest.mark.parametrize("dtype", DTYPES)
def test_dx_with_qv_slices_fp32_lora_and_a_conv1d_weight(launches, dtype):
    """B laid out densely by the forward's first launch (two enabled groups of three), fp32 A read as it is."""
    rows, n_in, n_out, rank = 45, 32, 96, 4
    x, weight, bias, lora_A, lora_B = _layer(rows, n_in, n_out, 2 * rank, dtype, torch.float32, conv1d=True)
    lora_B = lora_B[:2 * n_out // 3, :rank].contiguous()
    _check_backward(x, weight, bias, lora_A, lora_B, slices=(True, False, True))
    assert launches == [("forward", rows), ("dx", rows)]


def test_dx_of_a_strided_gradient_or_without_dx_falls_back_to_the_tiled_kernel(launches):
    """A gradient with every other column (no unit stride) and a backward for dA alone take the tiled kernel."""
    x, weight, bias, lora_A, lora_B = _layer(40, 32, 24, 4, torch.float16)
    grad = torch.randn(40, 48, generator=torch.Generator().manual_seed(3)).to(x)[:, ::2]
    _check_backward(x, weight, bias, lora_A, lora_B, grad=grad)
    _check_backward(x, weight, bias, lora_A, lora_B, needs=(False, True, True))
    assert [kind for kind, _ in launches] == ["forward"] * 2 * CAPABLE


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose base address is 2 bytes past a 16-byte boundary (strides unchanged)."""
    storage = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


UNALIGNED = {
    "strided x": lambda x, w: (torch.cat([x, x], 1)[:, ::2], w),
    "K of 13": lambda x, w: (x[:, :13].contiguous(), w[:, :13].contiguous()),
    "x off a 16-byte boundary": lambda x, w: (_misaligned(x), w),
    "W off a 16-byte boundary": lambda x, w: (x, _misaligned(w)),
    "N of 12": lambda x, w: (x, w[:12]),
    "Conv1D weight with N of 12": lambda x, w: (x, w[:12].t().contiguous().t()),
    "fp32": lambda x, w: (x.float(), w.float()),
}


@pytest.mark.parametrize("case", list(UNALIGNED))
def test_operands_tma_cannot_read_fall_back_to_the_tiled_kernel(launches, case):
    """Strided x, row strides or base addresses off 16 bytes, or fp32: the tiled kernel computes the forward."""
    x, weight, bias, lora_A, lora_B = _layer(40, 32, 24, 4, torch.float16)
    x, weight = UNALIGNED[case](x, weight)
    n_out, n_in = weight.shape
    lora_A, lora_B, bias = lora_A[:, :n_in].to(x.dtype), lora_B[:n_out].to(x.dtype), bias[:n_out].to(x.dtype)
    _check(x, weight, bias, lora_A, lora_B)
    assert launches == []


def test_tiled_is_the_default_route(monkeypatch):
    """Unless asked for, neither forward nor backward launches a persistent kernel, even where one applies."""
    monkeypatch.setattr(single, "GEMM", single.GEMM)
    triton_backend.set_gemm("tiled")
    for name in ("hopper_gemm", "hopper_dx"):
        monkeypatch.setattr(single, name, lambda *args: pytest.fail("a hopper kernel ran"))
    _check_backward(*_layer(70, 48, 40, 4, torch.float16), needs=(True, True, True))


def test_unknown_gemm_is_refused_naming_the_variable():
    with pytest.raises(ValueError, match="FASTLORA_TRITON_GEMM 'fast'"):
        triton_backend.set_gemm("fast")


@pytest.mark.parametrize("value, expected", [(None, "tiled"), (" Hopper ", "hopper")])
def test_environment_variable_chooses_the_route_at_import(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "FASTLORA_TRITON_GEMM"}
    if value is not None:
        env["FASTLORA_TRITON_GEMM"] = value
    code = "from fastlora.ops.triton import single; print(single.GEMM)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [expected]


@needs_tma
def test_forward_on_a_thread_of_its_own(launches):
    """Device-side descriptors need an allocator, which Triton keeps per thread: a forward on a new thread (as
    autograd's, or a data-parallel worker's) sets its own."""
    x, weight, bias, lora_A, lora_B = _layer(70, 48, 40, 4, torch.float16)
    errors = []

    def run():
        try:
            _check(x, weight, bias, lora_A, lora_B)
        except BaseException as error:  # reported on the test's thread
            errors.append(error)
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert not errors, errors
    assert launches == [("forward", 70)]


@needs_tma
def test_gradients_through_the_op_with_the_hopper_forward(launches, monkeypatch):
    """The public op on the triton backend: forward through the persistent kernel, gradients as the reference's."""
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    x, weight, bias, lora_A, lora_B = _layer(70, 48, 40, 4, torch.float16, torch.float32)
    x.requires_grad_()
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 0.7, 0.1, seed=11)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(grad)
    expected, leaves = float64_reference(x, weight, bias, lora_A, lora_B, 0.7, 0.1, 11)
    expected.backward(grad.double())
    assert rel_err(y, expected) <= TOLERANCE[torch.float16]
    for got, want in zip((x, lora_A, lora_B), leaves, strict=True):
        assert rel_err(got.grad, want.grad) <= TOLERANCE[torch.float16]
    assert launches == [("forward", 70), ("dx", 70)]


@needs_tma
def test_benchmark_dry_run_times_both_routes(tmp_path):
    """benchmarks/bench_hopper.py --dry-run: one tiny shape through both routes (forward, dx), its rows appended to
    the CSV it is given."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_hopper.py")
    results = tmp_path / "all.csv"
    result = subprocess.run([sys.executable, script, "--dry-run", "--csv", str(results)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with results.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["case"] for row in rows} == {"64->48 M=40 r=16 p=0.1 float16"}
    assert json.loads(rows[0]["params"])["hopper_route"] == {"forward": True, "dx": True}
    assert {row["contender"] for row in rows if row["metric"] == "time"} == {
        "cublas", "tiled", "hopper", "tiled gemm", "hopper gemm", "cublas dx", "tiled dx", "hopper dx"}
    errors = {row["contender"]: float(row["value"]) for row in rows if row["metric"] == "rel err"}
    assert set(errors) == {"tiled", "hopper", "tiled dx", "hopper dx"}
    assert all(error <= TOLERANCE[torch.float16] for error in errors.values()), errors


@pytest.mark.skipif(GPU, reason="the launch counter runs under the interpreter")
@pytest.mark.parametrize("slices", [None, (True, False, True)])
def test_hopper_route_keeps_the_kernel_budget(launches, monkeypatch, slices):
    """Forward and backward with the persistent kernels launch no more than the tiled route: the down kernel and
    the forward GEMM; the dx GEMM (dA fused), dB and the 16-bit gradients' conversion."""
    from test_kernel_budget import BACKWARD_BUDGET, FORWARD_BUDGET, counted

    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    rank = 4 * (2 if slices else 1)
    x, weight, bias, lora_A, lora_B = _layer(40, 32, 48, rank, torch.float16)
    if slices:
        lora_B = lora_B[:32, :4].contiguous()
    for t in (x, lora_A, lora_B):
        t.requires_grad_()
    with counted() as forward:
        y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 0.1, slices=slices)
    with counted() as backward:
        y.backward(torch.ones_like(y))
    (fwd_launches, fwd_ops), (bwd_launches, bwd_ops) = forward, backward
    assert fwd_launches == ["_lora_down_kernel", "_hopper_forward_kernel"]
    assert len(fwd_launches) + len(fwd_ops) <= FORWARD_BUDGET, fwd_ops
    assert len(bwd_launches) + len(bwd_ops) <= BACKWARD_BUDGET, (bwd_launches, bwd_ops)
    assert {"_hopper_dx_kernel", "_lora_db_kernel"} <= set(bwd_launches)
    assert launches == [("forward", 40), ("dx", 40)]
