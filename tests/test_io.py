"""Adapters on disk: peft interoperability both ways, slices round trip, validation before change."""

import json

import peft
import pytest
import torch
from conftest import randomize_lora, tiny_gpt2, tokens
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
from fastlora import LoraConfig, LoRALinear

QV = LoraConfig(r=4, alpha=32, dropout=0.1, target_modules=["c_attn"], slices={"c_attn": [True, False, True]})


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("config", [
    QV,
    LoraConfig(r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]),
    LoraConfig(r=4, alpha=8, use_rslora=True, target_modules="all-linear"),
], ids=["qv-slices", "conv1d", "rslora-all-linear"])
def test_saved_adapter_loads_in_peft_with_same_logits(tmp_path, config):
    model = fastlora.inject(tiny_gpt2(), config)
    randomize_lora(model)
    fastlora.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    ids = tokens()
    assert max_diff(logits(peft_model, ids), logits(model, ids)) <= 1e-5


def test_slices_export_as_whole_module_rank_2r_with_zero_k_rows(tmp_path):
    model = fastlora.inject(tiny_gpt2(), QV)
    randomize_lora(model)
    fastlora.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    A = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    assert A.shape == (8, 32) and B.shape == (96, 8)
    assert torch.count_nonzero(B[32:64]) == 0
    assert torch.count_nonzero(B[:32, 4:]) == 0 and torch.count_nonzero(B[64:, :4]) == 0
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True


def test_slices_adapter_imports_back_to_slices(tmp_path):
    model = fastlora.inject(tiny_gpt2(), QV)
    randomize_lora(model)
    fastlora.save_adapter(model, tmp_path)
    loaded = fastlora.load_adapter(tiny_gpt2(), tmp_path)
    for (name, layer), (_, original) in zip(fastlora.model.lora_layers(loaded), fastlora.model.lora_layers(model),
                                            strict=True):
        assert layer.slices == [True, False, True] and layer.r == 4, name
        assert layer.scale == pytest.approx(original.scale)
        assert torch.equal(layer.lora_A, original.lora_A) and torch.equal(layer.lora_B, original.lora_B)
    assert max_diff(logits(loaded, tokens()), logits(model, tokens())) == 0


def test_peft_adapter_into_an_already_sliced_model(tmp_path):
    """An adapter peft wrote (rank 8 over the whole c_attn, B zero outside the q and v blocks) loads into a model
    with q,v slices of rank 4: the same logits as peft's model, and each slice holds its own blocks."""
    peft_model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"],
                                                                   fan_in_fan_out=True))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.lora_A["default"].weight.copy_(torch.randn(8, 32, generator=gen))
                B = torch.zeros(96, 8)
                B[:32, :4], B[64:, 4:] = torch.randn(32, 4, generator=gen), torch.randn(32, 4, generator=gen)
                module.lora_B["default"].weight.copy_(B)
    peft_model.save_pretrained(tmp_path)
    target = fastlora.load_adapter(fastlora.inject(tiny_gpt2(), QV), tmp_path)
    assert max_diff(logits(target, tokens()), logits(peft_model, tokens())) <= 1e-5
    layer = target.transformer.h[0].attn.c_attn
    peft_layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.slices == [True, False, True] and layer.r == 4 and layer.scale == pytest.approx(16 / 8)
    assert torch.equal(layer.lora_A, peft_layer.lora_A["default"].weight)
    B = peft_layer.lora_B["default"].weight
    assert torch.equal(layer.lora_B, torch.cat([B[:32, :4], B[64:, 4:]]))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(10, 20), nn.Linear(20, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def peft_adapter(base, targets, tmp_path, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)
    peft_model = peft.get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path)
    return peft_model


PEFT_VARIANTS = [{}, {"use_rslora": True}, {"rank_pattern": {"fc2": 2}, "alpha_pattern": {"fc2": 5}}]


@pytest.mark.parametrize("kwargs", PEFT_VARIANTS)
def test_loads_peft_linear_adapters_with_same_logits(tmp_path, kwargs):
    peft_model = peft_adapter(MLP(), ["fc1", "fc2"], tmp_path, **kwargs)
    model = fastlora.load_adapter(MLP(), tmp_path)
    x = torch.randn(5, 10)
    with torch.no_grad():
        assert max_diff(model(x), peft_model(x)) <= 1e-5
    assert isinstance(model.fc1, LoRALinear) and not isinstance(model.head, LoRALinear)


def test_loads_peft_conv1d_adapters_with_same_logits(tmp_path):
    peft_model = peft_adapter(tiny_gpt2(), ["c_attn", "c_fc"], tmp_path, fan_in_fan_out=True)
    model = fastlora.load_adapter(tiny_gpt2(), tmp_path)
    ids = tokens()
    assert max_diff(logits(model, ids), logits(peft_model, ids)) <= 1e-5


def snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, snap):
    types, state = snap
    assert [type(m) for m in model.modules()] == types
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def saved(tmp_path):
    model = fastlora.inject(tiny_gpt2(), LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    randomize_lora(model)
    fastlora.save_adapter(model, tmp_path)
    return load_file(tmp_path / "adapter_model.safetensors"), json.loads((tmp_path / "adapter_config.json").read_text())


KEY_A = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
KEY_B = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"


def drop_key(tensors, config):
    del tensors[KEY_B]


def extra_key(tensors, config):
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_C.weight"] = torch.ones(3)


def magnitude_without_dora(tensors, config):
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"] = torch.ones(96)


def wrong_shape(tensors, config):
    tensors[KEY_A] = torch.zeros(4, 48)


def other_architecture(tensors, config):
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)


def not_lora(tensors, config):
    config["peft_type"] = "IA3"


def dora_without_magnitude(tensors, config):
    config["use_dora"] = True


def magnitude_of_the_wrong_shape(tensors, config):
    config["use_dora"] = True
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        tensors[key.replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(7)


@pytest.mark.parametrize(("corrupt", "message"), [
    (drop_key, "missing key base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"),
    (extra_key, "unexpected key 'base_model.model.transformer.h.0.attn.c_attn.lora_C.weight'"),
    (magnitude_without_dora, "holds base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector but "
                             "adapter_config.json has use_dora=false"),
    (wrong_shape, r"lora_A \(4, 48\).*expected lora_A \(r, 32\)"),
    (other_architecture, "names module 'model.layers.0.self_attn.q_proj', which GPT2LMHeadModel does not have"),
    (not_lora, "peft_type must be 'LORA', got 'IA3'"),
    (dora_without_magnitude, "use_dora=true but adapter_model.safetensors has no base_model.model.transformer.h.0"),
    (magnitude_of_the_wrong_shape, r"lora_magnitude_vector has shape \(7,\); the module has 96 output features"),
])
def test_bad_adapters_raise_and_leave_the_model_unchanged(tmp_path, corrupt, message):
    tensors, config = saved(tmp_path / "good")
    corrupt(tensors, config)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_text(json.dumps(config))
    injected = fastlora.inject(tiny_gpt2(), LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    for model in (tiny_gpt2(), injected):
        snap = snapshot(model)
        with pytest.raises(ValueError, match=message):
            fastlora.load_adapter(model, bad)
        assert_same(model, snap)


def test_adapter_missing_a_layer_the_model_has_is_an_error(tmp_path):
    saved(tmp_path)
    model = fastlora.inject(tiny_gpt2(), LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc", "c_proj"]))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no weights for the model's LoRA layers"):
        fastlora.load_adapter(model, tmp_path)
    assert_same(model, snap)


def test_non_block_structured_adapter_cannot_become_slices(tmp_path):
    tensors, config = saved(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_text(json.dumps(config))
    model = fastlora.inject(tiny_gpt2(), LoraConfig(r=2, alpha=8, target_modules=["c_attn", "c_fc"],
                                                    slices={"c_attn": [True, False, True]}))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not block-structured for slices"):
        fastlora.load_adapter(model, bad)
    assert_same(model, snap)


def test_only_safetensors_are_read(tmp_path):
    saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="never reads pickle"):
        fastlora.load_adapter(tiny_gpt2(), tmp_path)


def test_adapter_of_another_rank_than_the_models_layers_is_an_error(tmp_path):
    saved(tmp_path)
    model = fastlora.inject(tiny_gpt2(), LoraConfig(r=8, alpha=8, target_modules=["c_attn", "c_fc"]))
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"c_attn'? has shape \(4, 32\) but the model's LoRA layer has \(8, 32\)"):
        fastlora.load_adapter(model, tmp_path)
    assert_same(model, snap)


@pytest.mark.parametrize(("file", "content", "message"), [
    ("adapter_config.json", '{"peft_type": "LORA", "r": 4,', r"adapter_config.json is not valid JSON"),
    ("adapter_config.json", '["LORA"]', r"adapter_config.json must hold a JSON object, got list"),
    ("adapter_config.json", '{"peft_type": "LORA", "r": "four"}', r"r, lora_alpha and lora_dropout must be numbers"),
    ("adapter_model.safetensors", "not a safetensors file", r"adapter_model.safetensors is not a readable safetensors"),
])
def test_corrupt_adapter_files_are_errors_that_name_the_file(tmp_path, file, content, message):
    saved(tmp_path)
    (tmp_path / file).write_text(content)
    model = tiny_gpt2()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        fastlora.load_adapter(model, tmp_path)
    assert str(tmp_path) in str(error.value)
    assert_same(model, snap)


def test_saving_a_wrapped_model_writes_the_models_own_module_names(tmp_path):
    """torch.compile (and DDP) wrap the model; peft must still find the modules by their own names."""
    model = fastlora.inject(tiny_gpt2(), LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
    randomize_lora(model)
    fastlora.save_adapter(torch.compile(model, backend="eager"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    loaded = fastlora.load_adapter(torch.compile(tiny_gpt2(), backend="eager"), tmp_path)
    assert max_diff(logits(loaded, tokens()), logits(model, tokens())) == 0
