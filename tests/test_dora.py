"""DoRA: the op (``lora_linear(..., magnitude=m)``) on every backend against peft's DoRA layer and a float64
composition, forward and every gradient, slices, dropout and second order."""

import peft
import pytest
import torch
from conftest import backend_device, float64_dora, rel_err
from torch import nn

from fastlora import lora_linear
from fastlora.ops.reference import dropout_keep_mask

FP32 = 1e-5


def peft_dora(n_in: int, n_out: int, r: int, alpha: float, dropout: float, rslora: bool = False, seed: int = 0):
    """A peft DoRA layer over an nn.Linear with non-zero B and a magnitude moved off its initial norm."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(n_in, n_out)),
                                peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"],
                                                use_dora=True, use_rslora=rslora))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(n_out) + 0.5)
    return layer


def peft_with_mask(layer, seed: int, p: float) -> None:
    """Make peft's dropout apply fastlora's mask for ``seed`` (both then see the same dropped-out input)."""
    if p:
        def dropout(t):
            flat = t.reshape(-1, t.shape[-1])
            keep = dropout_keep_mask(torch.tensor(seed), flat.shape[0], flat.shape[1], p, t.device)
            return (flat * keep / (1 - p)).reshape(t.shape)
        layer.lora_dropout["default"].forward = dropout


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("rslora", [False, True])
def test_the_op_equals_peft_dora_forward_and_every_gradient(backend, dropout, rslora):
    device = backend_device(backend)
    layer = peft_dora(24, 18, 4, 6, dropout, rslora).to(device).train()
    peft_with_mask(layer, 7, dropout)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    expected = layer(x)
    dy = torch.randn_like(expected)
    expected.backward(dy)
    want = [t.grad.clone() for t in (x, A, B, m)]
    for t in (x, A, B, m):
        t.grad = None
    got = lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, A, B, layer.scaling["default"], dropout,
                      seed=7, magnitude=m)
    got.backward(dy)
    assert rel_err(got, expected) <= FP32
    for name, t, w in zip("xABm", (x, A, B, m), want, strict=True):
        assert rel_err(t.grad, w) <= FP32, name


@pytest.fixture
def torch_base_gemm(backend):
    """The cpu backend computing its base product with torch's GEMM, so that the base layer's output is torch's
    ``x @ W.T + b`` bit for bit (with OpenBLAS it is OpenBLAS's product plus b: test_ops_cpu.py)."""
    if backend != "cpu":
        yield
        return
    from fastlora.ops import cpu
    before = cpu.gemm()
    cpu.set_gemm("torch")
    yield
    cpu.set_gemm(before)


@pytest.mark.parametrize("slices", [None, (True, False, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_op_with_slices_matches_float64(backend, torch_base_gemm, slices, dropout):
    """With slices, m covers the enabled groups' features; a disabled group's output is the base's, bit for bit."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(3)
    enabled = sum(slices) if slices else 1
    n_in, n_out, r = 20, 24, 3
    rows = n_out // len(slices) * enabled if slices else n_out
    x = torch.randn(9, n_in, generator=gen).to(device).requires_grad_()
    weight, bias = torch.randn(n_out, n_in, generator=gen).to(device), torch.randn(n_out, generator=gen).to(device)
    A = (torch.randn(r * enabled, n_in, generator=gen) * 0.3).to(device).requires_grad_()
    B = (torch.randn(rows, r, generator=gen) * 0.3).to(device).requires_grad_()
    m = (torch.rand(rows, generator=gen) * 3 + 1).to(device).requires_grad_()
    got = lora_linear(x, weight, bias, A, B, 1.5, dropout, seed=4, slices=slices, magnitude=m)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in (x, A, B, m)]
    want = float64_dora(leaves64[0], weight.cpu(), bias.cpu(), *leaves64[1:], 1.5, dropout, 4, slices)
    assert rel_err(got, want) <= FP32
    dy = torch.randn(got.shape, generator=gen)
    got.backward(dy.to(device))
    want.backward(dy.double())
    for name, t, w in zip("xABm", (x, A, B, m), leaves64, strict=True):
        assert rel_err(t.grad, w.grad) <= FP32, name
    if slices:
        base = x.detach() @ weight.t() + bias
        assert torch.equal(got.detach()[:, 8:16], base[:, 8:16])


def test_dora_second_order_gradients_match_float64(backend):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 10, generator=gen).to(device).requires_grad_()
    weight, bias = torch.randn(12, 10, generator=gen).to(device), torch.randn(12, generator=gen).to(device)
    A, B = (torch.randn(2, 10, generator=gen) * 0.5).to(device), (torch.randn(12, 2, generator=gen) * 0.5).to(device)
    m = (torch.rand(12, generator=gen) + 1).to(device)
    params = [t.requires_grad_() for t in (A, B, m)]
    y = torch.tanh(lora_linear(x, weight, bias, *params[:2], 0.8, magnitude=params[2]))
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    got = torch.autograd.grad(y.sum() + gx.pow(2).sum(), params)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, A, B, m)]
    y64 = torch.tanh(float64_dora(leaves[0], weight.cpu(), bias.cpu(), *leaves[1:], 0.8, 0.0, 0, None))
    (gx64,) = torch.autograd.grad(y64.sum(), leaves[0], create_graph=True)
    want = torch.autograd.grad(y64.sum() + gx64.pow(2).sum(), leaves[1:])
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= FP32


def test_a_magnitude_of_the_wrong_shape_is_a_clear_error():
    x, weight, A, B = torch.randn(2, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(6,\), one per output feature of lora_B "
                                         r"\(6, 2\), got \(5,\)"):
        lora_linear(x, weight, None, A, B, 1.0, magnitude=torch.ones(5))
