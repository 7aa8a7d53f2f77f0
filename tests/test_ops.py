"""The shared correctness suite: every available backend against a float64 reference."""

import pytest
import torch
from conftest import TOLERANCE, backend_device, float64_reference, lora_update, rel_err

import fastlora
from fastlora import lora_linear
from fastlora.ops.reference import COL_MUL, ELEMENT_MUL, MIX_MUL_1, MIX_MUL_2, dropout_keep_mask

# (leading dims, in, out, rank): M=1, odd sizes, ranks 1..64, leading dims.
SHAPES = [
    ((1,), 16, 24, 4),
    ((7,), 33, 17, 1),
    ((2, 5), 64, 48, 8),
    ((3, 1, 13), 129, 65, 16),
    ((37,), 100, 260, 64),
    ((70,), 257, 131, 3),
]
DTYPES_BY_BACKEND = {
    "reference": [torch.float32, torch.bfloat16],
    "cpu": [torch.float32],
    "triton": [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else []),
}


def make_inputs(lead, n_in, n_out, rank, dtype, device, bias=True, slices=None, x_strided=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    enabled = sum(slices) if slices else 1
    rows = n_out // len(slices) * enabled if slices else n_out
    if x_strided:  # a non-contiguous view: every other column of a wider tensor
        x = rand(*lead, 2 * n_in)[..., ::2]
    else:
        x = rand(*lead, n_in)
    weight = rand(n_out, n_in, scale=n_in**-0.5)
    b = rand(n_out) if bias else None
    lora_A = rand(rank * enabled, n_in, scale=n_in**-0.5)
    lora_B = rand(rows, rank, scale=rank**-0.5)
    return x.requires_grad_(), weight, b, lora_A.requires_grad_(), lora_B.requires_grad_()


def check_against_reference(x, weight, bias, lora_A, lora_B, scale, p, seed, slices=None):
    y = lora_linear(x, weight, bias, lora_A, lora_B, scale, p, seed=seed, slices=slices)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref, (x64, a64, b64) = float64_reference(x, weight, bias, lora_A, lora_B, scale, p, seed, slices)
    y_ref.backward(grad.double())
    tol = TOLERANCE[x.dtype]
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= tol, f"forward error {rel_err(y, y_ref):.2e}"
    assert rel_err(x.grad, x64.grad) <= tol, f"dx error {rel_err(x.grad, x64.grad):.2e}"
    assert rel_err(lora_A.grad, a64.grad) <= tol, f"dA error {rel_err(lora_A.grad, a64.grad):.2e}"
    assert rel_err(lora_B.grad, b64.grad) <= tol, f"dB error {rel_err(lora_B.grad, b64.grad):.2e}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}r{s[3]}")
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_matches_float64_reference(backend, shape, dropout_p):
    device = backend_device(backend)
    for dtype in DTYPES_BY_BACKEND[backend]:
        inputs = make_inputs(*shape, dtype, device, seed=hash((shape, dropout_p)) % 1000)
        check_against_reference(*inputs, scale=1.7, p=dropout_p, seed=12345)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_strided", [True, False])
def test_bias_and_strided_input(backend, bias, x_strided):
    device = backend_device(backend)
    for dtype in DTYPES_BY_BACKEND[backend]:
        inputs = make_inputs((4, 9), 48, 40, 4, dtype, device, bias=bias, x_strided=x_strided, seed=7)
        check_against_reference(*inputs, scale=0.5, p=0.2, seed=99)


def test_transposed_weight_view(backend):
    """A Conv1D-style (in, out) weight used through .t() without a copy."""
    device = backend_device(backend)
    x, weight, bias, lora_A, lora_B = make_inputs((11,), 40, 56, 4, torch.float32, device, seed=3)
    weight_t = weight.t().contiguous().t()  # same values, (out, in) view of an (in, out) buffer
    assert not weight_t.is_contiguous()
    check_against_reference(x, weight_t, bias, lora_A, lora_B, scale=2.0, p=0.1, seed=5)


@pytest.mark.parametrize("slices", [[True, False, True], [False, True, False], [True, True]])
def test_slices(backend, slices):
    device = backend_device(backend)
    for dtype in DTYPES_BY_BACKEND[backend]:
        inputs = make_inputs((2, 6), 32, 48, 4, dtype, device, slices=slices, seed=11)
        check_against_reference(*inputs, scale=8.0, p=0.1, seed=4, slices=slices)


def test_disabled_slice_output_is_exactly_base(backend):
    """The disabled group's columns are x·W_gᵀ + b_g: bit for bit whatever A, B, scale and dropout are, and within
    fp32 rounding of the float64 base product; a gradient on them reaches neither A nor B, and dx is dy·W."""
    device = backend_device(backend)
    slices = [True, False, True]
    x, weight, bias, lora_A, lora_B = make_inputs((9,), 32, 48, 4, torch.float32, device, slices=slices, seed=2)
    y = lora_linear(x, weight, bias, lora_A, lora_B, 4.0, 0.1, seed=1, slices=slices)
    base = x.double() @ weight.double().t() + bias.double()
    assert rel_err(y[:, 16:32], base[:, 16:32]) <= TOLERANCE[torch.float32]
    assert rel_err(y[:, :16], base[:, :16]) > 0.1  # the enabled groups do get their update
    with torch.no_grad():
        other = lora_linear(x, weight, bias, 3 * lora_A + 1, -lora_B, 0.5, 0.6, seed=9, slices=slices)
    assert torch.equal(other[:, 16:32], y[:, 16:32])
    grad = torch.zeros_like(y)
    grad[:, 16:32] = torch.randn(9, 16, generator=torch.Generator().manual_seed(0)).to(device)
    y.backward(grad)
    assert not lora_A.grad.any() and not lora_B.grad.any()
    assert rel_err(x.grad, grad.double() @ weight.double()) <= TOLERANCE[torch.float32]


def test_dropout_is_reproducible_and_seed_dependent(backend):
    device = backend_device(backend)
    x, weight, bias, lora_A, lora_B = make_inputs((64,), 32, 16, 4, torch.float32, device, seed=5)
    with torch.no_grad():
        runs = [lora_linear(x, weight, bias, lora_A, lora_B, 1.0, 0.5, seed=s) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_dropout_off_in_eval_mode(backend):
    device = backend_device(backend)
    x, weight, bias, lora_A, lora_B = make_inputs((8,), 32, 16, 4, torch.float32, device, seed=6)
    with torch.no_grad():
        y_eval = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, 0.5, training=False)
        y_nodrop = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, 0.0)
    assert torch.equal(y_eval, y_nodrop)


def test_unseeded_dropout_follows_torch_manual_seed(backend):
    """Without a seed: torch.manual_seed repeats the mask, another seed gives another, and dropout is on.

    With W = 0, A = B = I and x = 1, the output is the LoRA branch's input: the keep-mask over 1-p."""
    device = backend_device(backend)
    n, p = 32, 0.5
    x = torch.ones(256, n, device=device)
    weight, eye = torch.zeros(n, n, device=device), torch.eye(n, device=device)

    def unseeded(torch_seed):
        torch.manual_seed(torch_seed)
        with torch.no_grad():
            return lora_linear(x, weight, None, eye, eye, 1.0, p)

    first, again, other = unseeded(0), unseeded(0), unseeded(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    for y in (first, other):
        dropped = y == 0
        assert torch.all(y[~dropped] == 1 / (1 - p))
        assert abs(dropped.float().mean().item() - p) < 0.03  # 8192 draws: 5.4 standard deviations


def _python_keep(seed: int, row: int, col: int, p: float) -> bool:
    """The dropout hash written out on Python ints: the spec every backend implements."""
    m = 0xFFFFFFFF

    def mix(h):
        h ^= h >> 16
        h = (h * MIX_MUL_1) & m
        h ^= h >> 15
        h = (h * MIX_MUL_2) & m
        return h ^ (h >> 15)

    row_key = mix(mix(row ^ (seed & m)) ^ ((seed >> 32) & m))
    col_key = mix((col * COL_MUL) & m)
    hashed = ((row_key ^ col_key) * ELEMENT_MUL) & m
    signed = hashed - 2**32 if hashed >= 2**31 else hashed
    return signed >= int(p * 2**32) - 2**31


def test_dropout_mask_matches_the_written_spec():
    seed, p = (7 << 32) + 12345, 0.25
    mask = dropout_keep_mask(torch.tensor(seed), 9, 300, p, torch.device("cpu"))
    expected = torch.tensor([[_python_keep(seed, r, c, p) for c in range(300)] for r in range(9)])
    assert torch.equal(mask, expected)
    big = dropout_keep_mask(torch.tensor(3), 512, 512, p, torch.device("cpu"))
    assert abs(big.float().mean().item() - (1 - p)) < 0.01


def test_zero_tokens(backend):
    device = backend_device(backend)
    x, weight, bias, lora_A, lora_B = make_inputs((0,), 16, 8, 2, torch.float32, device)
    y = lora_linear(x, weight, bias, lora_A, lora_B, 1.0, 0.1, seed=0)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 16)
    assert torch.count_nonzero(lora_A.grad) == 0


def penalized_grads(forward, x, params):
    """Gradients of ``sum(y) + |d sum(y) / dx|^2`` (a gradient penalty: second order) for ``params``."""
    y = forward(x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    return torch.autograd.grad(y.sum() + gx.pow(2).sum(), params)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("slices", [None, (True, False, True)])
def test_second_order_gradients_match_float64(backend, dropout_p, slices):
    """torch.autograd.grad(create_graph=True) through the op, then the penalty's gradients: exact, not silently
    those of a backward that autograd cannot differentiate."""
    device = backend_device(backend)
    x, weight, bias, lora_A, lora_B = make_inputs((2, 5), 24, 30, 3, torch.float32, device, slices=slices)
    got = penalized_grads(lambda t: torch.tanh(lora_linear(t, weight, bias, lora_A, lora_B, 1.5, dropout_p,
                                                           seed=9, slices=slices)), x, (lora_A, lora_B))
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, lora_A, lora_B))

    def composed(t):  # the op written in float64 torch ops
        flat = t.reshape(-1, t.shape[-1])
        keep = dropout_keep_mask(torch.tensor(9), flat.shape[0], flat.shape[1], dropout_p, flat.device)
        dropped = flat * keep / (1 - dropout_p) if dropout_p else flat
        y = flat @ weight.double().t() + bias.double() + lora_update(dropped, A64, B64, 1.5, slices, weight.shape[0])
        return torch.tanh(y)
    want = penalized_grads(composed, x64, (A64, B64))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 1e-5


def test_second_order_gradients_of_a_mixed_batch_match_each_adapter_alone(backend):
    from fastlora import lora_linear_mixed
    device = backend_device(backend)
    x, weight, bias, A0, B0 = make_inputs((4, 3), 16, 20, 2, torch.float32, device, seed=1)
    _, _, _, A1, B1 = make_inputs((4, 3), 16, 20, 5, torch.float32, device, seed=2)
    ids = torch.tensor([0, 1, 1, 0])

    def mixed(t):
        return torch.tanh(lora_linear_mixed(t, weight, bias, [A0, A1], [B0, B1], [1.0, 2.0], ids, 0.2, seed=3))
    got = penalized_grads(mixed, x, (A0, B0, A1, B1))
    rows = [ids == 0, ids == 1]

    def alone(t):
        ys = [torch.tanh(lora_linear(t, weight, bias, A, B, s, 0.2, seed=3)) for A, B, s in ((A0, B0, 1.0),
                                                                                              (A1, B1, 2.0))]
        return torch.where(rows[0][:, None, None], ys[0], ys[1])
    want = penalized_grads(alone, x, (A0, B0, A1, B1))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_lora_over_a_16_bit_input_keeps_fp32_precision_on_the_reference(dtype, monkeypatch):
    """As peft: the LoRA branch of fp32 parameters computes in fp32 over the 16-bit x, so dA and dB are as exact as
    fp32 allows against float64 of the same 16-bit inputs (not rounded to 16 bits)."""
    monkeypatch.setenv("FASTLORA_BACKEND", "reference")
    x, weight, bias, lora_A, lora_B = make_inputs((33,), 48, 40, 4, torch.float32, "cpu")
    x, weight, bias = (t.detach().to(dtype) for t in (x, weight, bias))
    y = lora_linear(x, weight, bias, lora_A, lora_B, 0.5)
    grad = torch.randn(y.shape).to(dtype)
    y.backward(grad)
    x64, A64, B64, dy64 = x.double(), lora_A.detach().double(), lora_B.detach().double(), grad.double()
    assert rel_err(lora_A.grad, 0.5 * (dy64 @ B64).t() @ x64) <= 1e-6
    assert rel_err(lora_B.grad, 0.5 * dy64.t() @ (x64 @ A64.t())) <= 1e-6
    y64 = x64 @ weight.double().t() + bias.double() + 0.5 * (x64 @ A64.t()) @ B64.t()
    assert y.dtype == dtype and rel_err(y, y64) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_a_second_backward_through_the_same_graph_adds_the_same_gradients(backend, dora, dropout_p):
    """``backward(retain_graph=True)`` twice: every gradient is twice one backward's (the first consumed the
    buffers its forward prepared, e.g. the triton backend's atomically accumulated ones; the second prepares anew)."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(40, 24, generator=gen).to(device).requires_grad_()
    weight, bias = torch.randn(64, 24, generator=gen).to(device), torch.randn(64, generator=gen).to(device)
    A = (torch.randn(4, 24, generator=gen) * 0.3).to(device).requires_grad_()
    B = (torch.randn(64, 4, generator=gen) * 0.3).to(device).requires_grad_()
    m = (torch.rand(64, generator=gen) + 1).to(device).requires_grad_() if dora else None
    leaves = [t for t in (x, A, B, m) if t is not None]
    y = lora_linear(x, weight, bias, A, B, 1.5, dropout_p, seed=3, magnitude=m)
    dy = torch.randn(y.shape, generator=gen).to(device)
    y.backward(dy, retain_graph=True)
    once = [t.grad.clone() for t in leaves]
    y.backward(dy)
    for t, g in zip(leaves, once, strict=True):
        assert rel_err(t.grad, 2 * g) <= 1e-6


@pytest.mark.parametrize("dora", [False, True])
def test_a_strided_bias_and_magnitude_are_read_through_their_strides(backend, dora):
    """Every other element of a longer tensor as the bias (and DoRA's m): the result of their contiguous copies."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(20, 16, generator=gen).to(device).requires_grad_()
    weight = torch.randn(32, 16, generator=gen).to(device)
    bias = torch.randn(64, generator=gen).to(device)[::2]
    A = (torch.randn(2, 16, generator=gen) * 0.3).to(device).requires_grad_()
    B = (torch.randn(32, 2, generator=gen) * 0.3).to(device).requires_grad_()
    m_storage = (torch.rand(64, generator=gen) + 1).to(device).requires_grad_() if dora else None
    m = m_storage[::2] if dora else None
    y = lora_linear(x, weight, bias, A, B, 1.5, magnitude=m)
    dy = torch.randn(y.shape, generator=gen).to(device)
    y.backward(dy)
    got = [t.grad.clone() for t in (x, A, B, *([m_storage] if dora else []))]
    for t in (x, A, B, *([m_storage] if dora else [])):
        t.grad = None
    m_copy = m.detach().contiguous().requires_grad_() if dora else None
    want = lora_linear(x, weight, bias.contiguous(), A, B, 1.5, magnitude=m_copy)
    assert rel_err(y, want) <= 1e-6
    want.backward(dy)
    for g, t in zip(got, (x, A, B), strict=False):
        assert rel_err(g, t.grad) <= 1e-6
    if dora:
        assert rel_err(got[3][::2], m_copy.grad) <= 1e-6
        assert torch.equal(got[3][1::2], torch.zeros(32, device=device))
    else:  # a mixed batch too
        ids = torch.tensor([i % 3 - 1 for i in range(20)])
        with torch.no_grad():
            mixed = fastlora.lora_linear_mixed(x, weight, bias, [A, A * 2], [B, B], [1.5, 0.5], ids)
            expected = fastlora.lora_linear_mixed(x, weight, bias.contiguous(), [A, A * 2], [B, B], [1.5, 0.5], ids)
        assert rel_err(mixed, expected) <= 1e-6
