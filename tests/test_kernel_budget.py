"""The triton backend's kernel budget: one forward runs at most 2 device kernels, one backward at most 4; with DoRA
(a magnitude) at most 3 and 5.

Counted under the interpreter (on a GPU, ``benchmarks/gpu_check.sh`` counts the real kernels with the torch
profiler): every Triton launch, and every aten op that would run a device kernel — all but allocations, views
and the seed drawn on the CPU. Casts of x, W and b under autocast are exempt (``F.linear`` pays them too);
casts of the LoRA parameters and of their gradients are not.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora

triton_backend = pytest.importorskip("fastlora.ops.triton", reason="triton is unavailable", exc_type=ImportError)
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counted under the interpreter; on a GPU "
                                "benchmarks/gpu_check.sh counts the kernels with the profiler")
aten = torch.ops.aten
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
             aten.new_empty_strided.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
             aten._reshape_alias.default, aten.as_strided.default, aten.t.default, aten.transpose.int,
             aten.permute.default, aten.expand.default, aten.detach.default, aten.alias.default, aten.slice.Tensor,
             aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.lift_fresh.default,
             aten.view.dtype}
FORWARD_BUDGET, BACKWARD_BUDGET = 2, 4
DORA_FORWARD_BUDGET, DORA_BACKWARD_BUDGET = 3, 5


class DeviceWork(TorchDispatchMode):
    """Counts aten ops that run a device kernel (see the module docstring); ``exempt`` tensors' casts are free."""

    def __init__(self, exempt=()):
        super().__init__()
        self.exempt = {t.data_ptr() for t in exempt if t is not None}
        self.ops: list[str] = []
        self.paused = False  # while the interpreter runs a kernel (its own tensor work is the kernel's)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused or func in NO_KERNEL:
            return out
        seed = func in (aten.randint.low, aten.randint.default, aten._local_scalar_dense.default) and (
            func is not aten._local_scalar_dense.default or args[0].dtype == torch.int64)  # drawn and read on the host
        exempt_cast = func is aten._to_copy.default and args[0].data_ptr() in self.exempt
        if not seed and not exempt_cast:
            self.ops.append(str(func))
        return out


@contextlib.contextmanager
def counted(exempt=()):
    """Counts the Triton launches and device aten ops inside the block: yields a list [launches, ops]."""
    from triton.runtime.interpreter import InterpretedFunction
    launches: list[str] = []
    original = InterpretedFunction.run
    mode = DeviceWork(exempt)

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        mode.paused = True
        try:
            return original(self, *args, **kwargs)
        finally:
            mode.paused = False

    InterpretedFunction.run = run
    result: list = []
    try:
        with mode:
            yield result
    finally:
        InterpretedFunction.run = original
        result += [launches, mode.ops]


def _case(rank, slices, dtype, lora_dtype, p, three_d, conv1d, autocast):
    gen = torch.Generator().manual_seed(rank)
    n_in, n_out = 40, 96  # slices of 2 or 3 groups: 48 or 32 features each (a multiple of 16, as in real models)
    enabled = sum(slices) if slices else 1
    x = torch.randn(2, 9, n_in, generator=gen) if three_d else torch.randn(18, n_in, generator=gen)
    x = x.to(torch.float32 if autocast else dtype).requires_grad_()
    weight = torch.randn(n_in, n_out, generator=gen).t() if conv1d else torch.randn(n_out, n_in, generator=gen)
    weight = weight.to(x.dtype)
    bias = torch.randn(n_out, generator=gen).to(x.dtype)
    lora_A = torch.randn(rank * enabled, n_in, generator=gen).to(lora_dtype).requires_grad_()
    rows = n_out // len(slices) * enabled if slices else n_out
    lora_B = torch.randn(rows, rank, generator=gen).to(lora_dtype).requires_grad_()
    return x, weight, bias, lora_A, lora_B


CASES = [  # rank, slices, dtype, LoRA parameters' dtype, dropout, 3-D input, Conv1D weight, CPU autocast (bf16)
    (16, None, torch.float32, torch.float32, 0.1, False, False, False),
    (5, None, torch.float32, torch.float32, 0.0, True, True, False),
    (24, None, torch.float16, torch.float16, 0.1, True, False, False),
    (4, (True, False, True), torch.float16, torch.float32, 0.1, True, True, False),
    (4, (True, False, True), torch.bfloat16, torch.bfloat16, 0.0, False, True, False),
    (8, None, torch.bfloat16, torch.float32, 0.1, True, False, False),
    (3, (False, True), torch.float32, torch.float32, 0.1, False, False, False),
    (16, None, torch.bfloat16, torch.float32, 0.1, True, True, True),
    (4, (True, False, True), torch.bfloat16, torch.float32, 0.1, True, True, True),
]


@pytest.mark.parametrize("gemm", ["tiled", "hopper"])
@pytest.mark.parametrize("rank, slices, dtype, lora_dtype, p, three_d, conv1d, autocast", CASES)
def test_forward_and_backward_stay_within_the_kernel_budget(monkeypatch, rank, slices, dtype, lora_dtype, p,
                                                            three_d, conv1d, autocast, gemm):
    """Every case, with the tiled GEMMs and with the persistent TMA ones (``FASTLORA_TRITON_GEMM=hopper``: 16-bit
    operands only, the interpreter standing in for sm_90)."""
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    monkeypatch.setattr(triton_backend.single, "GEMM", gemm)
    hopper = gemm == "hopper" and (autocast or dtype in (torch.float16, torch.bfloat16))
    x, weight, bias, lora_A, lora_B = _case(rank, slices, dtype, lora_dtype, p, three_d, conv1d, autocast)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context, counted(exempt=(x, weight, bias) if autocast else ()) as forward:
        y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, p, slices=slices)
    grad = torch.ones_like(y)
    with counted() as backward:
        y.backward(grad)
    (fwd_launches, fwd_ops), (bwd_launches, bwd_ops) = forward, backward
    assert len(fwd_launches) + len(fwd_ops) <= FORWARD_BUDGET, (fwd_launches, fwd_ops)
    assert len(bwd_launches) + len(bwd_ops) <= BACKWARD_BUDGET, (bwd_launches, bwd_ops)
    assert fwd_launches == ["_lora_down_kernel", "_hopper_forward_kernel" if hopper else "_lora_forward_kernel"]
    assert {"_hopper_dx_kernel" if hopper else "_lora_backward_kernel", "_lora_db_kernel"} <= set(bwd_launches)
    assert x.grad is not None and lora_A.grad.dtype == lora_dtype and lora_B.grad.dtype == lora_dtype


@pytest.mark.parametrize("rank, slices, dtype, lora_dtype, p, three_d, conv1d, autocast", CASES)
def test_dora_stays_within_its_kernel_budget(monkeypatch, rank, slices, dtype, lora_dtype, p, three_d, conv1d,
                                             autocast):
    """Every case with a magnitude (DoRA), with and without dropout: the norms take one launch more than LoRA's
    forward; the backward runs LoRA's kernels with the factors fused, plus dm's conversion for a 16-bit m."""
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    x, weight, bias, lora_A, lora_B = _case(rank, slices, dtype, lora_dtype, p, three_d, conv1d, autocast)
    magnitude = (torch.rand(lora_B.shape[0], generator=torch.Generator().manual_seed(rank)) + 1).to(lora_dtype)
    magnitude.requires_grad_()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context, counted(exempt=(x, weight, bias) if autocast else ()) as forward:
        y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, p, slices=slices, magnitude=magnitude)
    with counted() as backward:
        y.backward(torch.ones_like(y))
    (fwd_launches, fwd_ops), (bwd_launches, bwd_ops) = forward, backward
    assert len(fwd_launches) + len(fwd_ops) <= DORA_FORWARD_BUDGET, (fwd_launches, fwd_ops)
    assert len(bwd_launches) + len(bwd_ops) <= DORA_BACKWARD_BUDGET, (bwd_launches, bwd_ops)
    assert fwd_launches == ["_lora_down_kernel", "_dora_norm_kernel", "_lora_forward_kernel"]
    assert {"_lora_backward_kernel", "_lora_db_kernel"} <= set(bwd_launches)
    assert magnitude.grad is not None and magnitude.grad.dtype == lora_dtype and lora_B.grad.dtype == lora_dtype


def test_the_counter_sees_what_runs_a_kernel():
    """The counter is not blind: the peft-style unfused layer runs far more than the budget, F.linear one op."""
    x, weight, bias, lora_A, lora_B = _case(4, None, torch.float32, torch.float32, 0.1, True, False, False)
    with counted() as linear:
        torch.nn.functional.linear(x, weight, bias)
    with counted() as unfused:
        dropped = torch.nn.functional.dropout(x, 0.1)
        y = torch.nn.functional.linear(x, weight, bias) + (dropped @ lora_A.t()) @ lora_B.t() * 2.0
    assert len(linear[1]) == 1 and len(unfused[1]) >= 5
    with counted() as backward:
        y.sum().backward()
    assert len(backward[1]) > BACKWARD_BUDGET


def _mixed_case(adapters, dtype, lora_dtype, slices):
    """A (2, 9, 40) batch over ``adapters`` adapters of ranks 4, 8, 16, 5, ... (each named by some row, a few rows
    named by none), with its routing built once, outside the counted calls (as ``fastlora.use_adapters`` builds it
    once per batch for every layer)."""
    gen = torch.Generator().manual_seed(adapters)
    n_in, n_out = 40, 96
    x = torch.randn(2, 9, n_in, generator=gen).to(dtype).requires_grad_()
    weight, bias = torch.randn(n_out, n_in, generator=gen).to(dtype), torch.randn(n_out, generator=gen).to(dtype)
    ranks = [(4, 8, 16, 5)[a % 4] for a in range(adapters)]
    enabled = sum(slices) if slices else 1
    rows = n_out // len(slices) * enabled if slices else n_out
    As = [torch.randn(r * enabled, n_in, generator=gen).to(lora_dtype).requires_grad_() for r in ranks]
    Bs = [torch.randn(rows, r, generator=gen).to(lora_dtype).requires_grad_() for r in ranks]
    ids = torch.tensor([a % (adapters + 1) - 1 for a in range(18)]).view(2, 9)
    routing = fastlora.ops.routing.AdapterRouting(ids, adapters)
    routing.rows(x.shape[:-1], x.device)
    return x, weight, bias, As, Bs, routing


# A mixed batch, per call: forward = the adapters stacked (with their factor and threshold tables), h, the GEMM.
# Backward = the stacks again (gradient buffers zeroed and the selected adapters written in the same launch), g,
# the dx GEMM, h again, dA and dB; then autograd's copy of each dB whose rank is not its padded rank (the kernels
# write dB rank-padded, and a gradient's strides must match its parameter's), and, for 16-bit LoRA parameters,
# one cast of each dA and dB.
MIXED_FORWARD_BUDGET, MIXED_BACKWARD_BUDGET = 3, 6


@pytest.mark.parametrize("adapters", [1, 2, 4])
@pytest.mark.parametrize("dtype, lora_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                               (torch.float16, torch.float16)])
def test_mixed_batch_launch_counts(monkeypatch, adapters, dtype, lora_dtype):
    """The device kernels of one mixed forward and backward, for 1, 2 and 4 adapters: the forward's three, however
    many adapters; the backward's six, plus the per-adapter gradient copies and casts counted above."""
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    x, weight, bias, As, Bs, routing = _mixed_case(adapters, dtype, lora_dtype, None)
    scales = [2.0] * adapters
    with counted() as forward:
        y = fastlora.lora_linear_mixed(x, weight, bias, As, Bs, scales, routing, dropout_ps=0.1)
    grad = torch.ones_like(y)
    with counted() as backward:
        y.backward(grad)
    (fwd_launches, fwd_ops), (bwd_launches, bwd_ops) = forward, backward
    assert fwd_launches == ["_mixed_stack_kernel", "_mixed_down_kernel", "_mixed_gemm_kernel"] and not fwd_ops
    assert bwd_launches == ["_mixed_stack_kernel", "_mixed_down_kernel", "_mixed_gemm_kernel", "_mixed_down_kernel",
                            "_mixed_grad_kernel", "_mixed_grad_kernel"]
    padded = sum(B.shape[1] != triton_backend.tuning.rank_pad(max(b.shape[1] for b in Bs)) for B in Bs)
    casts = 2 * adapters if lora_dtype != torch.float32 else 0
    assert len(bwd_ops) == (casts or padded), bwd_ops
    assert len(fwd_launches) + len(fwd_ops) == MIXED_FORWARD_BUDGET
    assert len(bwd_launches) == MIXED_BACKWARD_BUDGET
    assert all(A.grad.dtype == lora_dtype and B.grad.dtype == lora_dtype for A, B in zip(As, Bs, strict=True))
