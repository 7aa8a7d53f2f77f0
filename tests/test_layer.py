"""LoRALinear: wraps Linear and Conv1D without copies, matches the formula, merges exactly."""

import pytest
import torch
from conftest import lora_update, rel_err
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastlora import LoRALinear


def conv1d(n_in, n_out):
    layer = Conv1D(n_out, n_in)
    nn.init.normal_(layer.weight, std=0.1)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


def random_lora(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    return layer


BASES = {"linear": lambda: nn.Linear(24, 36), "conv1d": lambda: conv1d(24, 36)}


@pytest.mark.parametrize("kind", BASES)
def test_equals_base_layer_at_init(kind):
    base = BASES[kind]()
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.1)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", BASES)
def test_wraps_without_copying_and_freezes_base(kind):
    base = BASES[kind]()
    layer = LoRALinear(base, r=2)
    assert layer.base_layer is base
    assert layer.base_weight().data_ptr() == base.weight.data_ptr()
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("slices", [None, [True, False, True]])
def test_forward_matches_formula(kind, slices):
    base = BASES[kind]()
    layer = random_lora(LoRALinear(base, r=4, alpha=6, slices=slices))
    x = torch.randn(7, 24, dtype=torch.float64).float()
    x64, A, B = x.double(), layer.lora_A.double(), layer.lora_B.double()
    expected = x64 @ layer.base_weight().double().t() + base.bias.double() + lora_update(x64, A, B, 1.5, slices, 36)
    assert rel_err(layer(x), expected) < 1e-5
    if slices:
        assert torch.count_nonzero(layer.delta_weight()[12:24]) == 0


class _Doubled(nn.Module):
    def forward(self, t):
        return 2 * t


@pytest.mark.parametrize("kind", BASES)
def test_forward_reads_swapped_and_parametrized_tensors(kind):
    """The forward reads parameters from the modules' dicts for speed: a parameter replaced after wrapping, a
    bias removed, and a parametrized weight or lora_B (a property, no longer in the dict) must all be honoured."""
    from torch.nn.utils import parametrize

    base = BASES[kind]()
    layer = random_lora(LoRALinear(base, r=4, alpha=4))
    x = torch.randn(5, 24)
    base.weight = nn.Parameter(torch.randn_like(base.weight), requires_grad=False)
    base.bias = None
    parametrize.register_parametrization(base, "weight", _Doubled())
    parametrize.register_parametrization(layer.adapters["default"], "lora_B", _Doubled())
    assert "weight" not in base._parameters and "lora_B" not in layer.adapters["default"]._parameters
    x64, A, B = x.double(), layer.lora_A.double(), layer.lora_B.double()
    expected = x64 @ layer.base_weight().double().t() + lora_update(x64, A, B, 1.0, None, 36)
    assert torch.equal(layer.base_weight(), 2 * base.parametrizations.weight.original.t()
                       if kind == "conv1d" else 2 * base.parametrizations.weight.original)
    assert rel_err(layer(x), expected) < 1e-5


def test_rslora_scale():
    assert LoRALinear(nn.Linear(4, 4), r=16, alpha=8, use_rslora=True).scale == pytest.approx(2.0)
    assert LoRALinear(nn.Linear(4, 4), r=16, alpha=8).scale == pytest.approx(0.5)


def test_gaussian_init_std():
    layer = LoRALinear(nn.Linear(4096, 8), r=4, init="gaussian")
    assert layer.lora_A.std().item() == pytest.approx(0.25, rel=0.05)
    assert torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("kind", BASES)
def test_merge_gives_base_forward_and_unmerge_restores(kind):
    base = BASES[kind]()
    original = base.weight.detach().clone()
    layer = random_lora(LoRALinear(base, r=4, alpha=8, slices=[True, True, False]))
    x = torch.randn(6, 24)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
        assert layer.merged and "merged='default'" in repr(layer)
        assert torch.equal(merged, base(x))
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        layer.merge()  # idempotent
        layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    assert not layer.merged


def test_extra_repr_shows_configuration():
    text = repr(LoRALinear(nn.Linear(6, 9), r=3, alpha=12, slices=[True, False, True]))
    for part in ("r=3", "alpha=12", "slices=[True, False, True]", "active='default'", "merged=None"):
        assert part in text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"r": 0}, "r must be an integer >= 1, got 0"),
    ({"alpha": -1.0}, "alpha must be a finite number > 0, got -1.0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"init": "zeros"}, "init must be one of"),
    ({"slices": [True, False, True, False, True]}, "divide out_features=36"),
    ({"slices": [False, False]}, "at least one"),
])
def test_bad_arguments_raise_and_leave_base_untouched(kwargs, message):
    base = nn.Linear(24, 36)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        LoRALinear(base, **kwargs)
    assert base.weight.requires_grad and base.bias.requires_grad
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_wrapping_a_non_linear_module_is_an_error():
    with pytest.raises(TypeError, match="got Conv2d"):
        LoRALinear(nn.Conv2d(3, 3, 1))


def test_lora_parameters_of_a_bf16_layer_are_fp32_and_train_in_fp32():
    """As peft keeps them: the op computes in bf16, A and B stay fp32 and get the gradients of that computation
    (float64 reference over the bf16-rounded operands), and an optimizer step far below bf16's resolution
    moves them by -lr * grad."""
    torch.manual_seed(0)
    base = nn.Linear(16, 24).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    grad = torch.randn(5, 24).to(torch.bfloat16)
    y.backward(grad)
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32

    a64, b64 = (t.detach().to(torch.bfloat16).double().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    x64 = x.double()
    expected = x64 @ base.weight.double().t() + base.bias.double() + 2.0 * (x64 @ a64.t()) @ b64.t()
    expected.backward(grad.double())
    assert rel_err(y, expected) <= 1e-2
    assert rel_err(layer.lora_A.grad, a64.grad) <= 1e-2 and rel_err(layer.lora_B.grad, b64.grad) <= 1e-2

    params = [layer.lora_A, layer.lora_B]
    before = [p.detach().clone() for p in params]
    lr = 1e-4 * min(p.abs().mean().item() / p.grad.abs().mean().item() for p in params)  # updates ~1e-4 relative
    torch.optim.SGD(params, lr=lr).step()
    for p, old in zip(params, before, strict=True):
        assert p.dtype == torch.float32 and rel_err(p.detach() - old, -lr * p.grad) <= 1e-2
        lost_in_bf16 = old.to(torch.bfloat16) == (old - lr * p.grad).to(torch.bfloat16)
        assert lost_in_bf16.float().mean() > 0.9  # bf16 parameters would not have moved
