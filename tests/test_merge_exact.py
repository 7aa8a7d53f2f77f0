"""merge() then unmerge() restores the base weights bit for bit in every dtype, any number of times;
``exact=False`` is the copy-free way, exact only to within rounding."""

import pytest
import torch
from conftest import randomize_lora, tiny_gpt2, tokens
from torch import nn

import fastlora
from fastlora import LoraConfig, LoRALinear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_layer(dtype, slices=None, out_features=96):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, out_features).to(dtype), r=4, alpha=32, slices=slices)
    layer.add_adapter("b", r=8, alpha=8)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape) * 0.1)
    return layer


@pytest.mark.parametrize("slices", [None, [True, False, True]], ids=["whole", "slices"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twenty_merge_unmerge_cycles_restore_the_base_weight_bit_for_bit(dtype, slices):
    layer = random_layer(dtype, slices)
    original = layer.weight.detach().clone()
    for _ in range(20):
        layer.merge()
        assert not torch.equal(layer.weight, original)  # the merge did change the weight
        layer.unmerge()
        assert torch.equal(layer.weight, original)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_adapters_merged_in_turn_restore_the_base_weight_bit_for_bit(dtype):
    layer = random_layer(dtype)
    original = layer.weight.detach().clone()
    x = torch.randn(5, 64, dtype=dtype)
    for name in ["default", "b", "default", "b"]:
        layer.set_adapter(name)
        with torch.no_grad():
            unmerged = layer(x)
            layer.merge()
            assert torch.equal(layer(x), layer.base_layer(x))
            torch.testing.assert_close(layer(x), unmerged, rtol=2e-2, atol=2e-2)
        layer.unmerge()
        assert torch.equal(layer.weight, original)


def test_lossy_merge_keeps_no_copy_and_drifts_in_bf16():
    """What exact=False trades away: no copy while merged, and bf16 base weights that change with each cycle."""
    layer = random_layer(torch.bfloat16)
    original = layer.weight.detach().clone()
    for _ in range(20):
        layer.merge(exact=False)
        assert layer._premerge_weight is None
        layer.unmerge()
    assert not torch.equal(layer.weight, original)


def test_the_copy_lives_only_while_merged_and_never_enters_the_state_dict():
    layer = random_layer(torch.float32)
    keys = set(layer.state_dict())
    layer.merge()
    assert layer._premerge_weight is not None and set(layer.state_dict()) == keys
    layer.unmerge()
    assert layer._premerge_weight is None


def test_model_merge_unmerge_is_exact_and_unload_keeps_the_merged_weights():
    model = fastlora.inject(tiny_gpt2().to(torch.bfloat16), LoraConfig(r=4, alpha=32, target_modules="all-linear"))
    randomize_lora(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        fastlora.unmerge(fastlora.merge(model))
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())

    lossy = fastlora.inject(tiny_gpt2().to(torch.bfloat16), LoraConfig(r=4, alpha=32, target_modules="all-linear"))
    randomize_lora(lossy)
    fastlora.merge(model)
    plain, expected = fastlora.unload(model, merge=True), fastlora.unload(lossy, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert all(torch.equal(expected.state_dict()[k], v) for k, v in plain.state_dict().items())
    with torch.no_grad():
        assert torch.equal(plain(tokens()).logits, expected(tokens()).logits)


def test_unload_without_merge_restores_an_exactly_merged_base():
    model = fastlora.inject(tiny_gpt2().to(torch.float16), LoraConfig(r=4, alpha=32, target_modules=["c_attn"]))
    randomize_lora(model)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    fastlora.merge(model)
    plain = fastlora.unload(model, merge=False)
    state = plain.state_dict()
    assert all(torch.equal(base[k.replace("c_attn.weight", "c_attn.base_layer.weight")
                                .replace("c_attn.bias", "c_attn.base_layer.bias")], v) for k, v in state.items())
