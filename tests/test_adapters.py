"""Several named adapters on one base model: add, switch, delete, mixed batches (each row its own adapter,
also in training), peft's multi-adapter folder layout both ways, and clear errors that change nothing."""

import peft
import pytest
import torch
from conftest import randomize_lora, rel_err, tiny_gpt2, tokens
from torch import nn

import fastlora
from fastlora import LoraConfig, LoRALinear

QV = {"c_attn": [True, False, True]}


def two_adapters(dropout: float = 0.0):
    """Tiny GPT-2 with adapter "default" (q,v of c_attn, r=4) and "b" (c_attn and c_fc, r=8), both non-zero."""
    model = fastlora.inject(tiny_gpt2(), LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=["c_attn"],
                                                    slices=QV))
    fastlora.inject(model, LoraConfig(r=8, alpha=16, dropout=dropout, target_modules=["c_attn", "c_fc"]),
                    adapter_name="b")
    randomize_lora(model)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_layer_adapters_add_switch_and_delete():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 24), r=4, alpha=8)
    layer.add_adapter("wide", r=8, alpha=4, slices=[True, False, True])
    randomize_lora(layer)
    x = torch.randn(5, 16)
    outputs = {}
    for name in ("default", "wide", None):
        layer.set_adapter(name)
        outputs[name] = layer(x)
    assert torch.equal(outputs[None], layer.base_layer(x))
    for name in ("default", "wide"):
        expected = layer.base_layer(x) + x @ layer.delta_weight(name).t()
        assert rel_err(outputs[name], expected) <= 1e-5
    assert layer.adapter("wide").lora_A.shape == (16, 16) and layer.adapter("wide").lora_B.shape == (16, 8)
    layer.set_adapter("wide")
    layer.delete_adapter("wide")
    assert list(layer.adapters) == ["default"] and layer.active_adapter is None
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda layer: layer.add_adapter("default"), ValueError, "already has an adapter named 'default'"),
    (lambda layer: layer.add_adapter("a.b"), ValueError, "adapter name must be a non-empty string without '.'"),
    (lambda layer: layer.add_adapter("x", r=0), ValueError, "r must be an integer >= 1, got 0"),
    (lambda layer: layer.set_adapter("nope"), KeyError, "no adapter named 'nope' on this layer"),
    (lambda layer: layer.delete_adapter("nope"), KeyError, "no adapter named 'nope'"),
])
def test_layer_adapter_errors_change_nothing(call, error, message):
    layer = LoRALinear(nn.Linear(8, 8), r=2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=message):
        call(layer)
    assert list(layer.adapters) == ["default"] and layer.active_adapter == "default"
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


def test_merged_adapter_must_be_unmerged_before_switching():
    layer = LoRALinear(nn.Linear(8, 8), r=2)
    layer.add_adapter("other", r=2)
    layer.merge()
    with pytest.raises(ValueError, match="'default' is merged into the base weight: unmerge it before activating"):
        layer.set_adapter("other")
    with pytest.raises(ValueError, match="unmerge it first"):
        layer.delete_adapter("default")
    layer.unmerge()
    layer.set_adapter("other")


def test_model_wide_switching_matches_a_model_with_that_adapter_alone(tmp_path):
    model = two_adapters()
    ids = tokens()
    assert fastlora.adapter_names(model) == ["default", "b"]
    fastlora.set_adapter(model, "b")
    fastlora.save_adapter(model, tmp_path / "b", name="b")
    only_b = fastlora.load_adapter(tiny_gpt2(), tmp_path / "b")
    assert rel_err(logits(model, ids), logits(only_b.eval(), ids)) <= 1e-6
    fastlora.set_adapter(model, None)
    assert torch.equal(logits(model, ids), logits(tiny_gpt2(), ids))
    fastlora.delete_adapter(model, "b")
    assert fastlora.adapter_names(model) == ["default"]
    assert all(name.endswith("adapters.default.lora_A") or name.endswith("adapters.default.lora_B")
               for name, _ in model.named_parameters() if "lora_" in name)


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = two_adapters()
    ids = tokens(batch=5)
    names = ["b", None, "default", "b", "default"]
    with fastlora.use_adapters(model, names):
        mixed = logits(model, ids)
    for name in ("default", "b", None):
        fastlora.set_adapter(model, name)
        rows = [i for i, n in enumerate(names) if n == name]
        assert rel_err(mixed[rows], logits(model, ids)[rows]) <= 1e-5, name
    assert all(layer.mixed is None for _, layer in fastlora.model.lora_layers(model))  # the block's end clears it


def test_two_adapters_train_in_one_batch_each_from_its_own_rows():
    model = two_adapters()
    model.train()
    ids = tokens(batch=4)
    names = ["default", "b", "b", "default"]
    with fastlora.use_adapters(model, names):
        loss_per_row = torch.nn.functional.cross_entropy(
            model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    loss_per_row.sum().backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name in ("default", "b"):
        model.zero_grad()
        fastlora.set_adapter(model, name)
        rows = [i for i, n in enumerate(names) if n == name]
        loss = torch.nn.functional.cross_entropy(model(ids[rows]).logits[:, :-1].transpose(1, 2), ids[rows, 1:],
                                                 reduction="none").mean(1)
        loss.sum().backward()
        for param_name, param in model.named_parameters():
            if f"adapters.{name}." in param_name:
                assert rel_err(mixed[param_name], param.grad) <= 1e-5, param_name


def test_several_adapters_in_peft_layout_both_ways(tmp_path):
    model = two_adapters()
    fastlora.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    reference = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    reference.load_adapter(tmp_path / "b", adapter_name="b")
    reference.eval()
    ids = tokens(batch=3)
    names = ["b", "default", "__base__"]
    with torch.no_grad():
        expected = reference(ids, adapter_names=names).logits
    with fastlora.use_adapters(model, [None if n == "__base__" else n for n in names]):
        assert rel_err(logits(model, ids), expected) <= 1e-5
    reference.save_pretrained(tmp_path / "from_peft")
    loaded = fastlora.load_adapter(tiny_gpt2(), tmp_path / "from_peft")
    fastlora.load_adapter(loaded, tmp_path / "from_peft" / "b", name="b")
    with fastlora.use_adapters(loaded, ["b", "default", None]):
        assert rel_err(logits(loaded.eval(), ids), expected) <= 1e-5


def test_loading_into_an_existing_adapter_of_another_rank_is_an_error(tmp_path):
    source = fastlora.inject(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]), adapter_name="x")
    fastlora.save_adapter(source, tmp_path, name="x")
    model = two_adapters()
    fastlora.inject(model, LoraConfig(r=8, target_modules=["c_attn"]), adapter_name="x")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    message = r"has shape \(4, 32\) but the model's LoRA layer has \(8, 32\) for adapter 'x'"
    with pytest.raises(ValueError, match=message):
        fastlora.load_adapter(model, tmp_path, name="x")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("names", "message"), [
    (["default", "nope"], r"unknown adapter names \['nope'\]"),
    ("default", "names must be a non-empty list of adapter names"),
    ([], "names must be a non-empty list of adapter names"),
])
def test_bad_mixed_batch_names_are_errors(names, message):
    model = two_adapters()
    with pytest.raises(ValueError, match=message), fastlora.use_adapters(model, names):
        pass
    assert all(layer.mixed is None for _, layer in fastlora.model.lora_layers(model))


def test_mixed_batch_of_the_wrong_size_is_an_error_and_leaves_no_state():
    model = two_adapters()
    with pytest.raises(ValueError, match=r"use_adapters gave 2 adapter names but this layer's input .* has 3"), \
            fastlora.use_adapters(model, ["b", "default"]):
        model(tokens(batch=3))
    assert all(layer.mixed is None for _, layer in fastlora.model.lora_layers(model))


def test_a_mixed_batch_routes_its_rows_once_for_every_layer(monkeypatch):
    """Every LoRA layer with the same adapters gets the same routing, so the rows are grouped by adapter and moved
    to the device once per batch for each set of adapters (here two: c_attn has both, c_fc only "b"), not once per
    layer; the next batch is routed anew."""
    from fastlora.ops import routing
    model = two_adapters()
    routed = []

    class Counted(routing.Rows):
        def __init__(self, *args):
            routed.append(1)
            super().__init__(*args)
    monkeypatch.setattr(routing, "Rows", Counted)
    names = ["b", None, "default", "b", "default"]
    with fastlora.use_adapters(model, names):
        first = logits(model, tokens(batch=5))
        layers = [layer for _, layer in fastlora.model.lora_layers(model)]
        assert len(routed) == len({id(layer.mixed[0]) for layer in layers}) == 2 < len(layers)
        assert torch.equal(logits(model, tokens(batch=5)), first) and len(routed) == 2
    with fastlora.use_adapters(model, [None, *names[1:]]):  # row 0 now gets the base alone
        changed = logits(model, tokens(batch=5))
    assert len(routed) == 4
    assert rel_err(changed[0], first[0]) > 1e-3 and rel_err(changed[1:], first[1:]) <= 1e-5  # only row 0 moved


def test_a_mixed_batch_under_inference_mode_equals_one_under_no_grad():
    """Under torch.inference_mode the ids and their device copies are inference tensors (no version counter):
    they are routed by their values, so batches one after another each get their own adapters."""
    model = two_adapters()
    orders = [["b", None, "default", "b", "default"], ["default", "b", None, "default", "b"]]
    expected = []
    for names in orders:
        with fastlora.use_adapters(model, names):
            expected.append(logits(model, tokens(batch=5)))
    assert rel_err(expected[0], expected[1]) > 1e-3
    with torch.inference_mode():
        for names, want in [*zip(orders, expected, strict=True), (orders[0], expected[0])]:
            with fastlora.use_adapters(model, names):
                assert rel_err(model(tokens(batch=5)).logits, want) <= 1e-6


@pytest.mark.parametrize("change", ["copy_", "assign", "add_"])
def test_a_mixed_batch_reads_adapter_weights_changed_through_data(backend, change):
    """Loaders, weight averaging and older training code write through ``.data``, which bumps no version counter:
    the next mixed batch still gives every row its adapter's current weights (q,v slices included)."""
    model = two_adapters()
    ids = tokens(batch=4)
    names = ["b", "default", None, "default"]
    with fastlora.use_adapters(model, names):
        logits(model, ids)  # a batch before the change
    gen = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if "lora_" in name:
            new = torch.randn(param.shape, generator=gen) * 0.1
            if change == "copy_":
                param.data.copy_(new)
            elif change == "assign":
                param.data = new
            else:
                param.data.add_(new)
    with fastlora.use_adapters(model, names):
        mixed = logits(model, ids)
    for row, name in enumerate(names):
        fastlora.set_adapter(model, name)
        assert rel_err(mixed[row], logits(model, ids[row:row + 1])[0]) <= 1e-5, (row, name)


def test_a_compiled_model_gives_eager_results_for_mixed_batches_and_changed_scales():
    model = two_adapters()
    ids = tokens(batch=3)
    names = ["b", None, "default"]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for _ in range(2):
            with fastlora.use_adapters(model, names):
                eager = logits(model, ids)
                assert rel_err(compiled(ids).logits, eager) <= 1e-6
            assert rel_err(compiled(ids).logits, logits(model, ids)) <= 1e-6
        for _, layer in fastlora.model.lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.scale *= 0.5
        assert rel_err(compiled(ids).logits, logits(model, ids)) <= 1e-6
