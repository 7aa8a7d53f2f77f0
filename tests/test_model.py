"""Model API on a tiny Hugging Face GPT-2: inject, train, slices, merge, unload, compile."""

import pytest
import torch
from conftest import randomize_lora, tiny_gpt2, tokens
from torch import nn

import fastlora
from fastlora import LoraConfig, LoRALinear

QV = LoraConfig(r=4, alpha=32, dropout=0.1, target_modules=["c_attn"], slices={"c_attn": [True, False, True]})


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_injected_model_equals_base_at_init():
    base, model = tiny_gpt2(), fastlora.inject(tiny_gpt2(), QV)
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=1e-6)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2


def test_only_lora_parameters_train():
    model = fastlora.inject(tiny_gpt2(), QV)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B") for n in trainable)
    summary = fastlora.trainable_summary(model)
    assert summary.trainable == 2 * (8 * 32 + 2 * 32 * 4)  # per layer: A (2r, in) + B (2 * out/3, r)
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert 0 < summary.percent < 100 and "trainable%" in str(summary)


def train(model, steps=8, seed=0):
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = tokens(4, 16, seed=3)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_falls_and_k_block_stays_exactly_zero():
    base, model = tiny_gpt2(), fastlora.inject(tiny_gpt2(), QV)
    losses = train(model)
    assert losses[-1] < losses[0] - 0.05
    n = 32
    for (_, layer), block in zip(fastlora.model.lora_layers(model), base.transformer.h, strict=True):
        delta = layer.delta_weight()
        assert torch.count_nonzero(delta[n:2 * n]) == 0 and torch.count_nonzero(delta[:n]) > 0
        # The k block's update is exactly zero: its output is bit for bit what the same backend computes
        # with no update at all (x W^T + b). It need not equal the plain Conv1D's bits: the cpu backend's
        # base GEMM may be OpenBLAS (on AMD) where Conv1D's is PyTorch's MKL, which rounds differently.
        x = torch.randn(5, n)
        with torch.no_grad():
            no_update = fastlora.lora_linear(x, layer.base_weight(), layer.base_layer.bias, layer.lora_A,
                                             torch.zeros_like(layer.lora_B), layer.scale, slices=layer.slices)
            y = layer.eval()(x)
            assert torch.equal(y[:, n:2 * n], no_update[:, n:2 * n])
            torch.testing.assert_close(y[:, n:2 * n], block.attn.c_attn(x)[:, n:2 * n], rtol=1e-5, atol=1e-6)


def test_merge_unmerge_round_trip():
    model = fastlora.inject(tiny_gpt2(), QV)
    randomize_lora(model)
    model.eval()
    ids = tokens()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = logits(model, ids)
    fastlora.merge(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    fastlora.unmerge(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge", [True, False])
def test_unload_gives_the_original_state_dict_layout(merge):
    original = tiny_gpt2()
    model = fastlora.inject(tiny_gpt2(), QV)
    randomize_lora(model)
    model.eval()
    ids = tokens()
    adapted = logits(model, ids)
    plain = fastlora.unload(model, merge=merge)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    expected = adapted if merge else logits(original, ids)
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)


def adapted_names(model):
    return sorted(n for n, _ in fastlora.model.lora_layers(model))


@pytest.mark.parametrize(("targets", "expected"), [
    (["c_attn"], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    (["transformer.h.1.mlp.c_fc"], ["transformer.h.1.mlp.c_fc"]),
    (r"transformer\.h\.0\..*c_proj", ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]),
])
def test_target_matching(targets, expected):
    model = fastlora.inject(tiny_gpt2(), LoraConfig(target_modules=targets))
    assert adapted_names(model) == expected


def test_all_linear_skips_the_output_head():
    model = fastlora.inject(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    names = adapted_names(model)
    assert len(names) == 2 * 4 and "lm_head" not in names


def test_all_linear_on_a_plain_module():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fastlora.inject(model, LoraConfig(target_modules="all-linear"))
    assert adapted_names(model) == ["0", "2"]


def assert_unchanged(model, reference):
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                strict=True))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("config", "message"), [
    (LoraConfig(target_modules=["nope"]), "matched no module"),
    (LoraConfig(target_modules=["attn"]), "'transformer.h.0.attn' is a GPT2Attention"),
    (LoraConfig(target_modules=["c_attn"], slices={"c_attn": [True] * 5}), "5 groups do not divide out_features=96"),
])
def test_bad_targets_raise_and_leave_the_model_unchanged(config, message):
    model, reference = tiny_gpt2(), tiny_gpt2()
    with pytest.raises(ValueError, match=message):
        fastlora.inject(model, config)
    assert_unchanged(model, reference)


def test_injecting_twice_is_an_error():
    model = fastlora.inject(tiny_gpt2(), QV)
    with pytest.raises(ValueError, match="already has LoRA"):
        fastlora.inject(model, QV)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"r": 0}, "LoraConfig.r must be an integer >= 1, got 0"),
    ({"r": 2.5}, "LoraConfig.r must be an integer >= 1, got 2.5"),
    ({"alpha": 0}, "LoraConfig.alpha must be a finite number > 0, got 0"),
    ({"dropout": -0.1}, r"LoraConfig.dropout must be in \[0, 1\), got -0.1"),
    ({"dropout": 1}, r"LoraConfig.dropout must be in \[0, 1\), got 1"),
    ({"init": "pissa"}, "LoraConfig.init must be one of .*got 'pissa'"),
    ({"target_modules": []}, "LoraConfig.target_modules must be a non-empty list"),
    ({"slices": {"c_attn": [False, False]}}, r"LoraConfig.slices\['c_attn'\] must be a list of bools"),
])
def test_config_validation_names_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 48)
        self.down = nn.Linear(48, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_torch_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    model = fastlora.inject(TwoLayer(), LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["up", "down"],
                                                   slices={"up": [True, False, True]}))
    randomize_lora(model)
    x = torch.randn(3, 7, 16)
    torch.manual_seed(5)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for grad, expected in zip([p.grad for p in model.parameters() if p.requires_grad], eager_grads, strict=True):
        torch.testing.assert_close(grad, expected)


def test_torch_compile_gpt2_has_no_graph_breaks():
    model = fastlora.inject(tiny_gpt2(), QV)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(tokens())
    assert explanation.graph_break_count == 0, explanation.break_reasons
