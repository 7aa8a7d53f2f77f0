"""The triton backend's fused DoRA (under the interpreter on CPU): every dtype, dropout, slices, Conv1D weights,
partial gradients and both dB/dm write paths against a float64 DoRA with the full (out, in) matrix."""

import pytest
import torch
from conftest import float64_dora, rel_err

import fastlora
from fastlora.ops import reference

triton_backend = pytest.importorskip("fastlora.ops.triton", reason="triton is unavailable", exc_type=ImportError)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# The interpreter's dots have no bfloat16 (numpy): there, float16 stands in for the 16-bit parameters.
BF16 = torch.bfloat16 if torch.cuda.is_available() else torch.float16


@pytest.fixture
def launches(monkeypatch):
    """The names of the triton kernels launched (under the interpreter), in order."""
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    if torch.cuda.is_available():
        return None
    from triton.runtime.interpreter import InterpretedFunction
    names: list[str] = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    return names


def _case(rows, n_in, n_out, rank, slices, dtype, lora_dtype, conv1d, seed=0):
    """x, W (a Conv1D's transposed view when ``conv1d``), b, A, B (stacked with slices) and m off its initial
    norms, all leaves of the graph but W and b."""
    gen = torch.Generator().manual_seed(seed)
    enabled = sum(slices) if slices else 1
    b_rows = n_out // len(slices) * enabled if slices else n_out
    x = torch.randn(rows, n_in, generator=gen)
    weight = torch.randn(n_in, n_out, generator=gen).t() if conv1d else torch.randn(n_out, n_in, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    A = torch.randn(rank * enabled, n_in, generator=gen) * 0.3
    B = torch.randn(b_rows, rank, generator=gen) * 0.3
    m = torch.rand(b_rows, generator=gen) * 3 + 1
    x, weight, bias = (t.to(DEVICE, dtype) for t in (x, weight, bias))
    A, B, m = (t.to(DEVICE, lora_dtype) for t in (A, B, m))
    return x.requires_grad_(), weight, bias, A.requires_grad_(), B.requires_grad_(), m.requires_grad_()


def _float64(x, weight, bias, A, B, m, scale, p, seed, slices, dy):
    """Output and (x, A, B, m) gradients of the float64 DoRA."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, A, B, m)]
    y = float64_dora(leaves[0], weight.detach().cpu(), bias.cpu(), *leaves[1:], scale, p, seed, slices)
    y.backward(dy.cpu().double())
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype, lora_dtype", [(torch.float32, torch.float32), (BF16, BF16),
                                               (torch.float16, torch.float32)])
@pytest.mark.parametrize("slices", [None, (True, False, True)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_dora_matches_float64(launches, dtype, lora_dtype, slices, p, conv1d):
    """Forward and every gradient, in three forward and at most four backward launches; a disabled slice's
    features equal the LoRA kernels' base output bit for bit."""
    x, weight, bias, A, B, m = _case(37, 40, 48, 4, slices, dtype, lora_dtype, conv1d)
    y = fastlora.lora_linear(x, weight, bias, A, B, 1.5, p, seed=11, slices=slices, magnitude=m)
    forward = list(launches) if launches is not None else None
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y.backward(dy)
    want, grads = _float64(x, weight, bias, A, B, m, 1.5, p, 11, slices, dy)
    tolerance = TOLERANCE[dtype]
    assert rel_err(y, want) <= tolerance
    for name, t, g in zip("xABm", (x, A, B, m), grads, strict=True):
        assert t.grad.dtype == t.dtype and rel_err(t.grad, g) <= max(tolerance, TOLERANCE[t.dtype]), name
    if forward is not None:
        assert forward == ["_lora_down_kernel", "_dora_norm_kernel", "_lora_forward_kernel"]
        assert {"_lora_backward_kernel", "_lora_db_kernel"} <= set(launches[3:])
    if slices:
        with torch.no_grad():
            lora = fastlora.lora_linear(x, weight, bias, A, B, 1.5, p, seed=11, slices=slices)
        assert torch.equal(y.detach()[:, 16:32], lora[:, 16:32])


@pytest.mark.parametrize("rows", [20, 70])  # one dB/dm program per column block (a store), or splits (atomic)
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True),
                                   (False, True, True, True)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fused_dora_backward_computes_only_what_is_needed(launches, rows, needs, p):
    """Each subset of (dx, dA, dB, dm) equals the reference's, the others None, with and without dB's row splits."""
    x, weight, bias, A, B, m = _case(rows, 24, 64, 3, None, torch.float32, torch.float32, False, seed=rows)
    seed = torch.tensor(5)
    dy = torch.randn(rows, 64, generator=torch.Generator().manual_seed(2))
    _, saved = triton_backend.dora_forward(x.detach(), weight, bias, A.detach(), B.detach(), m.detach(), 0.7, p,
                                           seed, None, needs)
    got = triton_backend.dora_backward(dy, x.detach(), weight, A.detach(), B.detach(), m.detach(), 0.7, p, seed,
                                       needs, None, saved)
    want = reference.dora_backward(dy, x.detach(), weight, A.detach(), B.detach(), m.detach(), 0.7, p, seed, needs,
                                   None)
    for name, need, g, w in zip(["x", "A", "B", "m"], needs, got, want, strict=True):
        assert (g is None) == (not need), name
        if need:
            assert rel_err(g, w) <= 1e-5, name


def test_fused_dora_backward_without_the_forward_saved_runs_it_again(launches):
    """A backward given nothing saved (the compiled path's) equals one given the forward's buffers."""
    x, weight, bias, A, B, m = _case(30, 24, 32, 2, None, torch.float32, torch.float32, True, seed=4)
    tensors = [t.detach() for t in (x, weight, A, B, m)]
    needs, seed, dy = (True, True, True, True), torch.tensor(9), torch.randn(30, 32)
    saved = triton_backend.dora_forward(tensors[0], tensors[1], bias, *tensors[2:], 1.2, 0.1, seed, None, needs)[1]
    with_saved = triton_backend.dora_backward(dy, *tensors, 1.2, 0.1, seed, needs, None, saved)
    again = triton_backend.dora_backward(dy, *tensors, 1.2, 0.1, seed, needs, None, ())
    for g, w in zip(again, with_saved, strict=True):
        assert torch.equal(g, w)


def test_a_zero_magnitude_still_gets_its_gradient(launches):
    """m_i = 0 makes feature i's output its bias (c = 0), but dm_i is still sum(dy * u) / n: u is kept, never
    recovered from y by dividing by c."""
    x, weight, bias, A, B, m = _case(25, 16, 32, 2, None, torch.float32, torch.float32, False, seed=6)
    with torch.no_grad():
        m[3] = 0.0
    y = fastlora.lora_linear(x, weight, bias, A, B, 2.0, magnitude=m)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(dy)
    want, grads = _float64(x, weight, bias, A, B, m, 2.0, 0.0, 0, None, dy)
    assert rel_err(y, want) <= 1e-5 and torch.equal(y.detach()[:, 3], bias[3].expand(25))
    assert rel_err(m.grad, grads[3]) <= 1e-5 and m.grad[3] != 0


def test_unfitting_slices_run_the_reference(launches):
    """Slices whose groups are no multiple of 16 features (the kernels' dB tile) take the reference's DoRA."""
    x, weight, bias, A, B, m = _case(9, 20, 24, 3, (True, False, True), torch.float32, torch.float32, False)
    y = fastlora.lora_linear(x, weight, bias, A, B, 1.5, slices=(True, False, True), magnitude=m)
    if launches is not None:
        assert "_dora_norm_kernel" not in launches
    want, _ = _float64(x, weight, bias, A, B, m, 1.5, 0.0, 0, (True, False, True), torch.zeros(9, 24))
    assert rel_err(y, want) <= 1e-5
