"""Autocast: every target kind (Linear, Conv1D, slices) runs in the autocast dtype, whatever dtype its input
arrives in, with fp32 LoRA parameters that get fp32 gradients; LoRA on every linear of GPT-2 trains under it."""

import itertools

import pytest
import torch
from conftest import TOLERANCE, float64_reference, lora_update, randomize_lora, rel_err, tiny_gpt2, tokens
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastlora
from fastlora import LoRALinear, lora_linear

# CPU autocast runs bf16 (the cpu backend is fp32-only, so bf16 goes to the reference backend); on a
# GPU the triton backend runs under CUDA autocast in fp16 and bf16.
CASES = [("cpu", torch.bfloat16)] + ([("cuda", torch.float16), ("cuda", torch.bfloat16)]
                                     if torch.cuda.is_available() else [])


def _layer(kind: str, device: str) -> LoRALinear:
    torch.manual_seed(0)
    base = Conv1D(36, 20) if kind == "conv1d" else nn.Linear(20, 36)
    layer = LoRALinear(base, r=4, alpha=8, slices=[True, False, True] if kind == "slices" else None).to(device)
    randomize_lora(layer, seed=3)
    return layer


def _as(dtype, *tensors):
    """Each tensor rounded to dtype, as autocast would cast it, then detached in float64."""
    return [None if t is None else t.detach().to(dtype).double() for t in tensors]


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("input_dtype", [torch.float32, "autocast"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "slices"])
def test_layer_runs_in_the_autocast_dtype_with_fp32_lora_gradients(kind, input_dtype, device, dtype):
    layer = _layer(kind, device)
    x = torch.randn(2, 7, 20, device=device, dtype=dtype if input_dtype == "autocast" else input_dtype)
    x.requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.base_layer.weight.dtype == torch.float32
    grad = torch.randn_like(y)
    y.backward(grad)
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == x.dtype

    x64, w64, b64, a64, bb64 = _as(dtype, x, layer.base_weight(), layer.base_layer.bias, layer.lora_A, layer.lora_B)
    for t in (x64, a64, bb64):
        t.requires_grad_()
    expected = x64 @ w64.t() + b64 + lora_update(x64, a64, bb64, layer.scale, layer.slices, 36)
    expected.backward(grad.double())
    assert rel_err(y, expected) <= TOLERANCE[dtype]
    assert rel_err(x.grad, x64.grad) <= TOLERANCE[dtype]
    assert rel_err(layer.lora_A.grad, a64.grad) <= TOLERANCE[dtype]
    assert rel_err(layer.lora_B.grad, bb64.grad) <= TOLERANCE[dtype]


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_op_under_autocast_with_dropout_matches_the_reference(device, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 24, generator=gen).to(device=device, dtype=dtype)
    weight, bias = torch.randn(30, 24, generator=gen).to(device), torch.randn(30, generator=gen).to(device)
    lora_A = torch.randn(3, 24, generator=gen).to(device).requires_grad_()
    lora_B = torch.randn(30, 3, generator=gen).to(device).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        y = lora_linear(x, weight, bias, lora_A, lora_B, 0.7, dropout_p=0.3, seed=11)
    y.backward(torch.ones_like(y))
    rounded = [t.to(dtype) for t in (x, weight, bias, lora_A, lora_B)]
    y_ref, (_, a64, b64) = float64_reference(*rounded[:3], rounded[3].requires_grad_(), rounded[4].requires_grad_(),
                                             0.7, 0.3, 11)
    y_ref.backward(torch.ones_like(y_ref))
    assert y.dtype == dtype and lora_A.grad.dtype == torch.float32
    assert rel_err(y, y_ref) <= TOLERANCE[dtype]
    assert rel_err(lora_A.grad, a64.grad) <= TOLERANCE[dtype]
    assert rel_err(lora_B.grad, b64.grad) <= TOLERANCE[dtype]


def _our_name(peft_name: str) -> str:
    """fastlora's parameter name for a peft one: ``base_model.model.X.lora_A.default.weight`` ->
    ``X.adapters.default.lora_A``."""
    module, _, part = peft_name.removeprefix("base_model.model.").removesuffix(".default.weight").rpartition(".")
    return f"{module}.adapters.default.{part}"


def _train(net, ids, device, dtype, steps):
    """``steps`` AdamW steps under autocast on one batch: the losses, and the dtype of every LoRALinear's output."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    out_dtypes = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: out_dtypes.add(out.dtype))
             for m in net.modules() if isinstance(m, LoRALinear)]
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = net(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        optimizer.step()
        losses.append(loss.item())
    for hook in hooks:
        hook.remove()
    return losses, out_dtypes


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_lora_on_every_linear_of_gpt2_trains_under_autocast_like_peft(device, dtype):
    """Attention's c_proj gets the bf16 output of attention while its weight is fp32: the case that raised.
    Four AdamW steps from the same adapter weights as peft's: every LoRA layer outputs the autocast dtype, the
    parameters stay fp32, the loss falls, and losses and trained weights follow peft's."""
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2().to(device)
    reference = get_peft_model(tiny_gpt2().to(device), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj",
                                                                                                      "c_fc"]))
    fastlora.inject(model, fastlora.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model)
    ours = {name: p for name, p in model.named_parameters() if "lora_" in name}
    with torch.no_grad():  # the same adapter weights in peft's layers
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(ours[_our_name(name)])
    ids = tokens().to(device)
    losses, out_dtypes = _train(model, ids, device, dtype, steps=4)
    peft_losses, _ = _train(reference, ids, device, dtype, steps=4)
    assert out_dtypes == {dtype}
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.1, losses
    for ours_loss, peft_loss in zip(losses, peft_losses, strict=True):
        assert abs(ours_loss - peft_loss) <= 1e-2 * abs(peft_loss), (losses, peft_losses)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trained) == set(ours) and all(p.dtype == torch.float32 for p in trained.values())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            assert rel_err(trained[_our_name(name)], p) <= 5e-2, name
