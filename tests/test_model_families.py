"""Model families beyond GPT-2: targets as peft picks them, training, peft adapters both ways, merge/unload.

Mostly the Llama family: bias-free ``nn.Linear`` projections with grouped-query attention (k_proj
and v_proj are narrower than q_proj) and a SwiGLU MLP (gate, up, down); Qwen2 adds a bias to q, k
and v. Then models whose code reads a projection's weight instead of calling it (T5, torch's
``nn.MultiheadAttention``). Models are tiny, random and built offline from configs.
"""

import peft
import pytest
import torch
from conftest import randomize_lora, rel_err, tokens
from torch import nn

import fastlora
from fastlora import LoraConfig, LoRALinear

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2
FAMILIES = ["llama", "qwen2"]
FP32 = 1e-5  # DESIGN.md: fp32 results agree to 1e-5 relative (Frobenius)


def tiny_llama(family: str = "llama", seed: int = 0, layers: int = LAYERS) -> nn.Module:
    """A small random causal LM of the Llama family: 4 query heads sharing 2 key/value heads (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return model_class(config).eval()


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def adapted_names(model):
    return sorted(name for name, _ in fastlora.model.lora_layers(model))


def peft_adapted_names(peft_model):
    prefix = "base_model.model."
    return sorted(name.removeprefix(prefix) for name, module in peft_model.named_modules()
                  if isinstance(module, peft.tuners.lora.LoraLayer))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def test_projections_have_the_shapes_this_file_relies_on(family):
    attn = tiny_llama(family).model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == attn.q_proj.out_features // 2  # grouped queries
    assert (attn.q_proj.bias is not None) == (family == "qwen2")


@pytest.mark.parametrize(("targets", "per_layer"), [
    (["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"], None),
    (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    (r"model\.layers\.\d+\.(self_attn\.k|mlp\.gate)_proj", ["k_proj", "gate_proj"]),
    ("all-linear", PROJECTIONS),
], ids=["exact-names", "suffixes", "regex", "all-linear"])
def test_targets_and_trainable_count_match_peft(family, targets, per_layer):
    model = fastlora.inject(tiny_llama(family), LoraConfig(r=4, alpha=8, target_modules=targets))
    peft_model = peft.get_peft_model(tiny_llama(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    names = adapted_names(model)
    assert names == peft_adapted_names(peft_model)
    if per_layer is None:
        assert names == sorted(targets)
    else:
        assert len(names) == LAYERS * len(per_layer)
        assert {name.rpartition(".")[2] for name in names} == set(per_layer)
    assert "lm_head" not in names
    assert fastlora.trainable_summary(model).trainable == peft_model.get_nb_trainable_parameters()[0]


def test_loss_falls_with_dropout_on(family):
    model = fastlora.inject(tiny_llama(family), LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    model.train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(4, 16, seed=3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"),
    LoraConfig(r=8, alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"]),
], ids=["all-linear", "rslora-qkv"])
def test_saved_adapter_loads_in_peft_with_same_logits(family, tmp_path, config):
    model = fastlora.inject(tiny_llama(family), config)
    randomize_lora(model)
    fastlora.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(family), tmp_path)
    ids = tokens()
    expected, base = logits(model, ids), logits(tiny_llama(family), ids)
    assert rel_err(logits(peft_model, ids), expected) <= FP32
    assert rel_err(expected, base) > 1e-2  # the adapter changes the model


@pytest.mark.parametrize("kwargs", [
    {"target_modules": "all-linear"},
    {"target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"], "use_rslora": True,
     "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    {"target_modules": ["k_proj"], "alpha_pattern": {r"layers\.1\..*k_proj": 3}},
], ids=["all-linear", "rslora-rank-alpha-patterns", "regex-alpha-pattern"])
def test_peft_adapter_loads_with_peft_logits_and_saves_back(family, tmp_path, kwargs):
    peft_model = peft.get_peft_model(tiny_llama(family), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, **kwargs))
    randomize_lora(peft_model)  # peft starts B at zero: make the update non-zero
    peft_model.save_pretrained(tmp_path / "peft")
    model = fastlora.load_adapter(tiny_llama(family), tmp_path / "peft")
    ids = tokens()
    assert adapted_names(model) == peft_adapted_names(peft_model)
    expected = logits(peft_model, ids)
    assert rel_err(logits(model, ids), expected) <= FP32
    assert rel_err(expected, logits(tiny_llama(family), ids)) > 1e-3  # the adapter changes the logits
    fastlora.save_adapter(model, tmp_path / "fastlora")  # per-module ranks and alphas go back as peft patterns
    assert rel_err(logits(peft.PeftModel.from_pretrained(tiny_llama(family), tmp_path / "fastlora"), ids),
                   expected) <= FP32


def adapted_model(family):
    model = fastlora.inject(tiny_llama(family), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model)
    return model.eval()


def test_merge_then_unmerge(family):
    model, ids = adapted_model(family), tokens()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    unmerged = logits(model, ids)
    fastlora.merge(model)
    assert all(layer.merged for _, layer in fastlora.model.lora_layers(model))
    assert rel_err(logits(model, ids), unmerged) <= FP32
    fastlora.unmerge(model)
    for name, param in model.named_parameters():  # W + dW - dW: a float32 rounding or two of values below 1
        torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)
    assert rel_err(logits(model, ids), unmerged) <= FP32


def test_unload_without_merge_restores_the_exact_original_state_dict(family):
    original = tiny_llama(family).state_dict()
    plain = fastlora.unload(adapted_model(family), merge=False)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    state = plain.state_dict()
    assert list(state) == list(original)
    assert all(torch.equal(state[key], original[key]) for key in original)


def test_unload_with_merge_gives_a_plain_model_with_the_adapted_logits(family):
    model, ids = adapted_model(family), tokens()
    adapted = logits(model, ids)
    plain = fastlora.unload(model)
    assert type(plain) is type(tiny_llama(family))
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in tiny_llama(family).state_dict().items()}
    assert rel_err(logits(plain, ids), adapted) <= FP32


def test_t5_reads_the_weight_of_an_adapted_projection():
    """T5's feed-forward casts its input to ``wo.weight.dtype``: a LoRA layer exposes its base weight (as peft's)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=101, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)
    model = fastlora.inject(T5ForConditionalGeneration(config), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    layer = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(layer, LoRALinear) and layer.weight is layer.base_layer.weight and layer.bias is None
    ids = tokens()
    model(input_ids=ids, decoder_input_ids=ids, labels=ids).loss.backward()
    assert layer.lora_B.grad.abs().sum() > 0


def test_multihead_attention_out_proj_is_never_a_target():
    """nn.MultiheadAttention reads out_proj's weight and never calls it: LoRA there would silently do nothing."""
    torch.manual_seed(0)
    model = fastlora.inject(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                            LoraConfig(target_modules="all-linear"))
    assert adapted_names(model) == ["linear1", "linear2"]
    assert model(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    with pytest.raises(ValueError, match=r"'self_attn\.out_proj' is the out_proj of an nn\.MultiheadAttention"):
        fastlora.inject(nn.TransformerEncoderLayer(16, 2, 32), LoraConfig(target_modules=["out_proj"]))


def test_all_linear_never_targets_the_model_itself():
    """A bare Linear cannot replace itself in place: "all-linear" finds nothing to adapt in it."""
    with pytest.raises(ValueError, match="'all-linear' matched no module of Linear"):
        fastlora.inject(nn.Linear(4, 4), LoraConfig(target_modules="all-linear"))
