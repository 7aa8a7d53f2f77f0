"""Mixed batches: every available backend's ``lora_linear_mixed`` against a float64 reference and against the
single-adapter op, forward and gradients; bad input is a clear error before anything runs."""

import pytest
import torch
from conftest import TOLERANCE, backend_device, lora_update, rel_err
from test_ops import DTYPES_BY_BACKEND

from fastlora import lora_linear, lora_linear_mixed
from fastlora.ops.reference import dropout_keep_mask


def make_adapters(ranks, n_in, n_out, dtype, device, seed=0, slices=None):
    gen = torch.Generator().manual_seed(seed)
    As, Bs = [], []
    for r in ranks:
        enabled = sum(slices) if slices else 1
        rows = n_out // len(slices) * enabled if slices else n_out
        As.append((torch.randn(r * enabled, n_in, generator=gen) * n_in**-0.5).to(device, dtype).requires_grad_())
        Bs.append((torch.randn(rows, r, generator=gen) * r**-0.5).to(device, dtype).requires_grad_())
    return As, Bs


def float64_mixed(x, weight, bias, As, Bs, scales, ps, row_ids, seed, slices=None):
    """The mixed op written row by row in float64; autograd gives the reference gradients."""
    x64 = x.detach().double().reshape(-1, x.shape[-1]).requires_grad_()
    A64 = [A.detach().double().requires_grad_() for A in As]
    B64 = [B.detach().double().requires_grad_() for B in Bs]
    y = x64 @ weight.double().t() + (bias.double() if bias is not None else 0)
    rows = []
    for i, a in enumerate(row_ids.tolist()):
        if a < 0:
            rows.append(y[i])
            continue
        x_i = x64[i]
        if ps[a] > 0:
            keep = dropout_keep_mask(torch.tensor(seed), x64.shape[0], x64.shape[1], ps[a], x64.device)[i]
            x_i = x_i * keep / (1 - ps[a])
        rows.append(y[i] + lora_update(x_i, A64[a], B64[a], scales[a], slices, weight.shape[0]))
    return torch.stack(rows).reshape(*x.shape[:-1], weight.shape[0]), x64, A64, B64


def check_mixed(x, weight, bias, As, Bs, scales, ps, adapter_ids, seed, row_ids, slices=None):
    y = lora_linear_mixed(x, weight, bias, As, Bs, scales, adapter_ids, ps, seed=seed,
                          slices=[slices] * len(As) if slices else None)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref, x64, A64, B64 = float64_mixed(x, weight, bias, As, Bs, scales, ps, row_ids, seed, slices)
    y_ref.backward(grad.double())
    tol = TOLERANCE[x.dtype]
    assert y.dtype == x.dtype and rel_err(y, y_ref) <= tol, f"forward error {rel_err(y, y_ref):.2e}"
    assert rel_err(x.grad.reshape(-1, x.shape[-1]), x64.grad) <= tol
    for a in range(len(As)):
        if a not in row_ids.tolist():  # no row names it: no gradient at all
            assert As[a].grad is None and Bs[a].grad is None
            continue
        assert rel_err(As[a].grad, A64[a].grad) <= tol, f"dA[{a}] error {rel_err(As[a].grad, A64[a].grad):.2e}"
        assert rel_err(Bs[a].grad, B64[a].grad) <= tol, f"dB[{a}] error {rel_err(Bs[a].grad, B64[a].grad):.2e}"


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_mixed_batch_matches_float64_reference(backend, dropout):
    """Ranks differ between adapters; some rows use none; one adapter is named by no row."""
    device = backend_device(backend)
    for dtype in DTYPES_BY_BACKEND[backend]:
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(23, 40, generator=gen).to(device, dtype).requires_grad_()
        weight = (torch.randn(36, 40, generator=gen) * 40**-0.5).to(device, dtype)
        bias = torch.randn(36, generator=gen).to(device, dtype)
        As, Bs = make_adapters([4, 1, 16, 8], 40, 36, dtype, device)
        ids = torch.tensor([0, 2, -1, 1, 2, 2, 0, -1, 1, 0, 0, 2, 2, 1, -1, 0, 2, 1, 1, 0, 2, 2, 0])
        check_mixed(x, weight, bias, As, Bs, [2.0, 0.5, 1.0, 3.0], [dropout, dropout / 2, dropout, 0.0], ids,
                    17, ids)


def test_per_sequence_ids_with_strided_input_and_slices(backend):
    device = backend_device(backend)
    for dtype in DTYPES_BY_BACKEND[backend]:
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(3, 5, 2 * 24, generator=gen).to(device, dtype)[..., ::2].requires_grad_()
        weight = (torch.randn(24, 36, generator=gen) * 24**-0.5).to(device, dtype).t()  # Conv1D-style view
        As, Bs = make_adapters([2, 3], 24, 36, dtype, device, slices=[True, False, True])
        ids = torch.tensor([1, -1, 0])
        check_mixed(x, weight, None, As, Bs, [1.5, 4.0], [0.1, 0.1], ids, 5, ids.repeat_interleave(5),
                    slices=[True, False, True])


def test_each_row_equals_the_single_adapter_op_of_its_adapter(backend):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 32, generator=gen).to(device)
    weight, bias = torch.randn(20, 32, generator=gen).to(device), torch.randn(20, generator=gen).to(device)
    As, Bs = make_adapters([4, 8, 2], 32, 20, torch.float32, device, seed=6)
    ids = torch.tensor([2, 0, 1, 0])
    with torch.no_grad():
        y = lora_linear_mixed(x, weight, bias, As, Bs, [1.0, 2.0, 0.5], ids, 0.3, seed=9)
        for a in range(3):
            single = lora_linear(x, weight, bias, As[a], Bs[a], [1.0, 2.0, 0.5][a], 0.3, seed=9)
            rows = ids == a
            assert rel_err(y[rows], single[rows]) <= 1e-6


def test_all_rows_one_adapter_is_the_single_adapter_op(backend):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, 24, generator=gen).to(device).requires_grad_()
    weight = torch.randn(16, 24, generator=gen).to(device)
    As, Bs = make_adapters([4], 24, 16, torch.float32, device, seed=8)
    y = lora_linear_mixed(x, weight, None, As, Bs, [2.0], torch.zeros(9, dtype=torch.long), 0.2, seed=3)
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, As[0], Bs[0])]
    for t in (x, As[0], Bs[0]):
        t.grad = None
    single = lora_linear(x, weight, None, As[0], Bs[0], 2.0, 0.2, seed=3)
    single.sum().backward()
    assert rel_err(y, single) <= 1e-6
    for got, t in zip(grads, (x, As[0], Bs[0]), strict=True):
        assert rel_err(got, t.grad) <= 1e-6


def good():
    As, Bs = make_adapters([2, 4], 8, 12, torch.float32, "cpu")
    return {"x": torch.randn(3, 8), "weight": torch.randn(12, 8), "bias": torch.randn(12), "lora_As": As,
            "lora_Bs": Bs, "scales": [1.0, 2.0], "adapter_ids": torch.tensor([0, -1, 1])}


@pytest.mark.parametrize(("change", "message"), [
    ({"adapter_ids": torch.tensor([0, 2, 1])}, r"adapter_ids must be in \[-1, 2\) for 2 adapters .* from 0 to 2"),
    ({"adapter_ids": torch.tensor([0, -2, 1])}, r"adapter_ids must be in \[-1, 2\)"),
    ({"adapter_ids": torch.tensor([0, 1])}, r"adapter_ids must have the shape of x's leading dims .* x's leading "
                                            r"dims \(3,\), adapter_ids \(2,\)"),
    ({"adapter_ids": torch.tensor([0.0, 1.0, 1.0])}, "adapter_ids must be an integer tensor"),
    ({"scales": [1.0]}, r"need one entry per adapter, got 2, 2, 1, 2, 2 and 2"),
    ({"lora_Bs": [torch.randn(12, 2), torch.randn(12, 3)]}, r"adapter 1: lora_B must have shape \(12, 4\)"),
])
def test_bad_mixed_arguments_are_clear_errors(change, message):
    """The error comes before anything runs: no dropout seed is drawn from torch's generator."""
    args = good() | {"dropout_ps": 0.2} | change
    rng = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=message):
        lora_linear_mixed(**args)
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_fp32_adapter_beside_bf16_ones_over_a_bf16_layer_computes_in_bf16():
    """Each adapter is cast on its own (as lora_linear casts fp32 LoRA parameters of a 16-bit layer)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 16, generator=gen).to(torch.bfloat16)
    weight = torch.randn(12, 16, generator=gen).to(torch.bfloat16)
    As, Bs = make_adapters([2, 4], 16, 12, torch.float32, "cpu", seed=10)
    As[0], Bs[0] = As[0].detach().to(torch.bfloat16), Bs[0].detach().to(torch.bfloat16)
    ids = torch.tensor([0, 1, -1, 1, 0, 1])
    with torch.no_grad():
        y = lora_linear_mixed(x, weight, None, As, Bs, [1.0, 2.0], ids)
    expected, *_ = float64_mixed(x, weight, None, [t.to(torch.bfloat16) for t in As],
                                 [t.to(torch.bfloat16) for t in Bs], [1.0, 2.0], [0.0, 0.0], ids, 0)
    assert y.dtype == torch.bfloat16 and rel_err(y, expected) <= TOLERANCE[torch.bfloat16]
