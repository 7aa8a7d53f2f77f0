"""fastlora.accelerate on peft models: the same results as peft's own forward, in place, with peft's API intact.

Tiny GPT-2 (Conv1D, fan_in_fan_out), Llama and Qwen2 (bias on q, k, v) peft models built offline. Each test
compares an accelerated peft model with an untouched copy of it; a counter on fastlora's op proves that the
accelerated layers did compute through fastlora.
"""

import copy
import pickle
import sys

import peft
import pytest
import torch
from conftest import rel_err, tiny_gpt2, tokens
from test_model_families import tiny_llama
from torch import nn

import fastlora

ACCELERATE = sys.modules["fastlora.accelerate"]  # the module: fastlora.accelerate is the function
FP32 = 1e-5  # DESIGN.md: fp32 results agree to 1e-5 relative (Frobenius)
FAMILIES = ["gpt2", "llama", "qwen2"]
IDS = tokens(3, 10, seed=2)


def base_model(family: str) -> nn.Module:
    return tiny_gpt2() if family == "gpt2" else tiny_llama(family)


def peft_config(family: str, **overrides) -> peft.LoraConfig:
    """LoRA on every linear, with rsLoRA and per-module rank and alpha (peft's scaling in full)."""
    first = "h.0.attn.c_attn" if family == "gpt2" else "layers.0.self_attn.q_proj"
    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "use_rslora": True,
                "rank_pattern": {first: 6}, "alpha_pattern": {first: 3}, "fan_in_fan_out": family == "gpt2"}
    return peft.LoraConfig(**{**settings, **overrides})


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-zero LoRA weights (B starts at zero) so that every comparison depends on them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def peft_pair(family: str, **overrides) -> tuple[nn.Module, nn.Module]:
    """(a peft model, an accelerated deep copy of it)."""
    model = randomize(peft.get_peft_model(base_model(family), peft_config(family, **overrides)))
    fast = copy.deepcopy(model)
    report = fastlora.accelerate(fast, strict=True)
    assert len(report.fused) == sum(isinstance(m, peft.tuners.lora.Linear) for m in model.modules())
    return model, fast


@pytest.fixture
def op_calls(monkeypatch) -> dict[str, int]:
    """How often the accelerated layers called fastlora's single-adapter and mixed-batch ops."""
    calls = {"single": 0, "mixed": 0}

    def counted(kind, op):
        def call(*args, **kwargs):
            calls[kind] += 1
            return op(*args, **kwargs)
        return call
    monkeypatch.setattr(ACCELERATE, "lora_linear", counted("single", ACCELERATE.lora_linear))
    monkeypatch.setattr(ACCELERATE, "lora_linear_mixed", counted("mixed", ACCELERATE.lora_linear_mixed))
    return calls


def lora_layers(model) -> int:
    return sum(isinstance(m, peft.tuners.lora.Linear) for m in model.modules())


def loss_and_grads(model, ids=IDS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(got: dict, expected: dict, tolerance: float = FP32) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert rel_err(got[name], expected[name]) <= tolerance, name


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def test_logits_and_every_lora_gradient_equal_peft(family, op_calls):
    model, fast = peft_pair(family)
    logits, grads = loss_and_grads(model.train())
    fast_logits, fast_grads = loss_and_grads(fast.train())
    assert op_calls["single"] == lora_layers(fast)
    assert rel_err(fast_logits, logits) <= FP32
    assert len(grads) == 2 * lora_layers(model)
    assert_close(fast_grads, grads)


def test_the_module_tree_parameters_and_state_dict_do_not_change(family):
    model = randomize(peft.get_peft_model(base_model(family), peft_config(family)))
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    fastlora.accelerate(model)
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert list(model.state_dict()) == keys
    assert all(isinstance(m, peft.tuners.lora.Linear) for m in model.modules() if type(m).__name__ == "FusedLinear")


def adamw_losses(model, steps: int = 4) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adamw_steps_track_peft(family):
    model, fast = peft_pair(family)
    expected, got = adamw_losses(model.train()), adamw_losses(fast.train())
    assert got[-1] < got[0] - 0.01  # it trained
    assert got == pytest.approx(expected, rel=1e-5)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # 1e-4: AdamW divides by sqrt(v); gradients that agree to 1e-6 give steps that agree to ~1e-5
    assert_close({n: p for n, p in fast.named_parameters() if p.requires_grad}, lora, tolerance=1e-4)


def test_dropout_has_peft_expectation_with_fastlora_masks():
    """Dropout on: fastlora draws its own masks (a hash of seed, row and column), so single draws differ from
    peft's; the expectation of the output and of dA and dB (linear in the mask) is the same: the dropout-free
    value. Measured over 300 draws on one layer, for both."""
    p, draws = 0.5, 300
    model, fast = peft_pair("gpt2", lora_dropout=p)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    g = torch.randn(6, 96, generator=torch.Generator().manual_seed(1))

    def one(layer, seed):
        torch.manual_seed(seed)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        (y * g).sum().backward()
        return [y.detach(), layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]

    def mean(layer):
        samples = [one(layer, seed) for seed in range(draws)]
        return [torch.stack(parts).mean(0) for parts in zip(*samples, strict=True)]

    peft_layer = model.base_model.model.transformer.h[1].attn.c_attn.train()
    fast_layer = fast.base_model.model.transformer.h[1].attn.c_attn.train()
    exact = [t.clone() for t in one(peft_layer.eval(), 0)]  # eval: no dropout
    assert rel_err(one(fast_layer.eval(), 0)[0], exact[0]) <= FP32
    peft_layer.train(), fast_layer.train()
    assert min(rel_err(s, e) for s, e in zip(one(fast_layer, 0), exact, strict=True)) > 0.2  # one draw: far off
    assert not torch.allclose(one(fast_layer, 0)[1], one(peft_layer, 0)[1])  # other masks than peft's
    for fast_mean, peft_mean, e in zip(mean(fast_layer), mean(peft_layer), exact, strict=True):
        # sampling error of a mean of 300 draws at p=0.5: ~1/sqrt(300) = 6% relative per element, less in norm
        assert rel_err(fast_mean, e) < 0.1 and rel_err(peft_mean, e) < 0.1


def test_save_pretrained_of_an_accelerated_model_loads_in_plain_peft(family, tmp_path):
    _, fast = peft_pair(family)
    adamw_losses(fast.train(), steps=2)
    fast.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(base_model(family), tmp_path).eval()
    assert not any(type(m).__name__ == "FusedLinear" for m in loaded.modules())
    with torch.no_grad():
        assert rel_err(loaded(IDS).logits, fast.eval()(IDS).logits) <= FP32


def test_merge_and_unload_and_disable_adapter_work(family, op_calls):
    model, fast = peft_pair(family)
    with torch.no_grad():
        base_logits = base_model(family)(IDS).logits
        expected = model.eval()(IDS).logits
        with fast.disable_adapter():
            assert torch.equal(fast.eval()(IDS).logits, base_logits)
        assert op_calls["single"] == 0  # disabled: peft's forward runs the base layer alone
        fast.merge_adapter()
        assert rel_err(fast(IDS).logits, expected) <= FP32
        fast.unmerge_adapter()
        assert rel_err(fast(IDS).logits, expected) <= FP32
        merged = fast.merge_and_unload()
        assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
        assert rel_err(merged(IDS).logits, expected) <= FP32


def two_adapter_pair(family: str) -> tuple[nn.Module, nn.Module]:
    model = peft.get_peft_model(base_model(family), peft_config(family))
    model.add_adapter("other", peft_config(family, r=2, lora_alpha=5, use_rslora=False))
    randomize(model)
    fast = copy.deepcopy(model)
    fastlora.accelerate(fast, strict=True)
    return model, fast


def test_set_adapter_and_several_active_adapters_equal_peft(family, op_calls):
    model, fast = two_adapter_pair(family)
    for active in ("other", ["default", "other"]):
        for m in (model, fast):
            m.base_model.set_adapter(active)
        calls = op_calls["single"]
        logits, grads = loss_and_grads(model.train())
        fast_logits, fast_grads = loss_and_grads(fast.train())
        assert op_calls["single"] - calls == lora_layers(fast)
        assert rel_err(fast_logits, logits) <= FP32
        assert_close(fast_grads, grads)


def test_mixed_batch_adapter_names_equal_peft(family, op_calls):
    model, fast = two_adapter_pair(family)
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        expected = model.eval()(IDS, adapter_names=names).logits
        got = fast.eval()(IDS, adapter_names=names).logits
    assert op_calls["mixed"] == lora_layers(fast)
    assert rel_err(got, expected) <= FP32
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # peft's own check and message
        fast(IDS, adapter_names=names[:2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_base_with_fp32_lora_gives_peft_dtype_and_values(dtype):
    """16-bit results are judged as flash-attention's: fastlora's error from the fp32 model at most twice
    peft's own (or 1e-2, DESIGN.md's 16-bit bound)."""
    model, fast = peft_pair("llama")
    with torch.no_grad():
        exact = model.eval()(IDS).logits

    def assert_like_peft(got, expected):
        assert got.dtype == expected.dtype
        assert rel_err(got, exact) <= max(2 * rel_err(expected, exact), 1e-2)

    model, fast = model.to(dtype), fast.to(dtype)
    for m in (model, fast):  # peft keeps LoRA parameters in fp32 over a 16-bit base (autocast_adapter_dtype)
        for name, param in m.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    with torch.no_grad():
        expected, got = model.eval()(IDS).logits, fast.eval()(IDS).logits
        assert expected.dtype == dtype
        assert_like_peft(got, expected)
        with torch.autocast("cpu", dtype=dtype):
            expected, got = model.float()(IDS).logits, fast.float()(IDS).logits
        assert_like_peft(got, expected)


def test_dtypes_the_op_does_not_take_run_on_peft(op_calls):
    model, fast = peft_pair("llama")
    for m in (model, fast):  # bf16 LoRA over an fp32 model: peft casts x for the LoRA branch, the op would refuse
        for name, param in m.named_parameters():
            if "lora_" in name:
                param.data = param.data.bfloat16()
    with torch.no_grad():
        assert torch.equal(fast(IDS).logits, model(IDS).logits)
    assert op_calls["single"] == 0


def test_layers_fastlora_cannot_run_stay_on_peft_with_a_reason():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=["v_proj"], use_dora=True))
    model.add_adapter("biased", peft.LoraConfig(r=4, target_modules=["o_proj"], lora_bias=True))
    randomize(model)
    with pytest.raises(ValueError, match="strict=True: 3 peft LoRA layers cannot be fused"):
        fastlora.accelerate(model, strict=True)
    assert not any(isinstance(m, ACCELERATE.FusedLinear) for m in model.modules())  # strict changed nothing
    reference = copy.deepcopy(model)
    report = fastlora.accelerate(model)
    assert len(report.fused) == 4  # the q_proj layers, and the v_proj ones with DoRA
    why = report.unfused
    assert "layer.Embedding: fastlora fuses peft's lora.Linear only" in why["base_model.model.model.embed_tokens"]
    assert "base_model.model.model.layers.0.self_attn.v_proj" in report.fused
    assert "has lora_bias" in why["base_model.model.model.layers.1.self_attn.o_proj"]
    assert "fused" in str(report) and "lora_bias" in str(report)
    for active in ("default", "dora", "biased"):
        for m in (model, reference):
            m.set_adapter(active)
        with torch.no_grad():
            assert rel_err(model(IDS).logits, reference(IDS).logits) <= FP32, active


class CustomLinear(nn.Linear):
    """A Linear subclass, as quantized and other custom base layers are: its forward may not be F.linear."""


def test_custom_and_hooked_base_layers_stay_on_peft():
    holder = nn.Module()
    holder.custom, holder.hooked, holder.plain = CustomLinear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    holder.hooked.register_forward_hook(lambda module, args, out: out * 2)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["custom", "hooked", "plain"]), holder)
    report = fastlora.accelerate(holder)
    assert report.fused == ["plain"]
    assert "CustomLinear (fastlora needs a plain nn.Linear" in report.unfused["custom"]
    assert "the base layer has hooks" in report.unfused["hooked"]


def test_an_unsupported_adapter_added_after_accelerate_runs_on_peft(op_calls):
    model, fast = peft_pair("llama")
    for m in (model, fast):
        m.add_adapter("biased", peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
        m.set_adapter("biased")
    randomize(model), randomize(fast)
    with torch.no_grad():
        assert rel_err(fast(IDS).logits, model(IDS).logits) <= FP32
    assert op_calls["single"] == 0


def test_a_trainable_base_bias_runs_on_peft(op_calls):
    model, fast = peft_pair("qwen2", bias="all")  # peft trains every bias: fastlora's op keeps them frozen
    logits, grads = loss_and_grads(model.train())
    fast_logits, fast_grads = loss_and_grads(fast.train())
    assert rel_err(fast_logits, logits) <= FP32
    assert_close(fast_grads, grads)
    assert op_calls["single"] == lora_layers(fast) - 3 * 2  # q, k and v have a trainable bias in both layers


def test_restore_brings_back_peft_forward(op_calls):
    model, fast = peft_pair("gpt2")
    restored = fastlora.restore(fast)
    assert len(restored) == lora_layers(fast)
    assert all(type(m) is peft.tuners.lora.Linear for m in fast.modules() if isinstance(m, peft.tuners.lora.Linear))
    with torch.no_grad():
        assert torch.equal(fast(IDS).logits, model(IDS).logits)
    assert op_calls["single"] == 0


def test_an_accelerated_model_survives_deepcopy_and_pickle(op_calls):
    model, fast = peft_pair("gpt2")
    with torch.no_grad():
        expected = model(IDS).logits
        for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            assert rel_err(clone(IDS).logits, expected) <= FP32
    assert op_calls["single"] == 2 * lora_layers(fast)


def test_bad_input_is_an_error_naming_the_argument():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        fastlora.accelerate("not a model")
    with pytest.raises(ValueError, match="holds no peft LoRA layers"):
        fastlora.accelerate(tiny_gpt2())


def test_trainer_trains_an_accelerated_model_and_saves_a_peft_adapter(tmp_path, op_calls):
    from transformers import Trainer, TrainingArguments

    _, fast = peft_pair("gpt2")
    rows = [{"input_ids": ids, "labels": ids} for ids in tokens(8, 10, seed=5)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = Trainer(model=fast, args=args, train_dataset=rows)
    before = {n: p.detach().clone() for n, p in fast.named_parameters() if p.requires_grad}
    trainer.train()
    assert op_calls["single"] >= 4 * lora_layers(fast)
    assert all(not torch.equal(p, before[n]) for n, p in fast.named_parameters() if p.requires_grad)
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "out").eval()
    with torch.no_grad():
        assert rel_err(loaded(IDS).logits, fast.eval()(IDS).logits) <= FP32


def test_torch_compile_traces_an_accelerated_model_without_graph_breaks(op_calls):
    model = randomize(peft.get_peft_model(tiny_llama(layers=1), peft_config("llama")))
    fast = copy.deepcopy(model)
    fastlora.accelerate(fast, strict=True)
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    logits, grads = loss_and_grads(model.train())
    fast.zero_grad(set_to_none=True)
    out = compiled(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert op_calls["single"] == lora_layers(fast)  # traced through fastlora's op
    assert rel_err(out.logits, logits) <= FP32
    assert_close({n: p.grad for n, p in fast.named_parameters() if p.requires_grad}, grads)


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward"])
def test_hooks_added_after_accelerate_run_as_in_peft(hook, op_calls):
    """A hook registered on a base layer after accelerate is honoured on every call (peft's forward runs while it
    is there); a second accelerate then reports that layer unfused and truly puts it back on peft's class."""
    model, fast = peft_pair("llama")
    seen = {id(model): 0, id(fast): 0}
    for m in (model, fast):
        base = m.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        owner = id(m)
        if hook == "forward":
            base.register_forward_hook(lambda module, args, out: out * 2)
        elif hook == "forward_pre":
            base.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
        else:
            base.register_full_backward_hook(lambda module, gin, gout, owner=owner: seen.__setitem__(owner, 1))
    logits, grads = loss_and_grads(model.train())
    fast_logits, fast_grads = loss_and_grads(fast.train())
    assert rel_err(fast_logits, logits) <= FP32
    assert_close(fast_grads, grads)
    assert seen[id(fast)] == seen[id(model)]
    assert op_calls["single"] == lora_layers(fast) - 1
    report = fastlora.accelerate(fast)
    assert list(report.unfused) == ["base_model.model.model.layers.0.self_attn.q_proj"]
    q_proj = fast.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is peft.tuners.lora.Linear and "the base layer has hooks" in str(report)
    with pytest.raises(ValueError, match="strict=True: 1 peft LoRA layers cannot be fused"):
        fastlora.accelerate(fast, strict=True)


def test_a_hook_on_an_adapter_module_or_every_module_runs_as_in_peft(op_calls):
    model, fast = peft_pair("gpt2")
    for m in (model, fast):
        m.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].register_forward_hook(
            lambda module, args, out: out * 3)
    with torch.no_grad():
        assert rel_err(fast(IDS).logits, model(IDS).logits) <= FP32
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
        try:
            calls = op_calls["single"]
            assert rel_err(fast(IDS).logits, model(IDS).logits) <= FP32
            assert op_calls["single"] == calls  # a global hook: every layer on peft's forward
        finally:
            handle.remove()


def test_the_fused_class_keeps_peft_name_in_repr_and_layer_status():
    model, fast = peft_pair("gpt2")
    assert repr(fast) == repr(model)
    assert [s.module_type for s in fast.get_layer_status()] == [s.module_type for s in model.get_layer_status()]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_gradient_penalty_gives_peft_second_order_gradients(backend, monkeypatch):
    """torch.autograd.grad(create_graph=True) through accelerated layers, then backward: peft's LoRA gradients
    (an MLP: torch's CPU attention kernels have no second derivative)."""
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 1))
    model = randomize(peft.get_peft_model(mlp, peft.LoraConfig(r=4, target_modules=["0", "2", "4"])))
    fast = copy.deepcopy(model)
    assert len(fastlora.accelerate(fast, strict=True).fused) == 3
    x = torch.randn(5, 12)
    grads = []
    for m in (model, fast):
        inputs = x.clone().requires_grad_()
        out = m(inputs).sum()
        (g,) = torch.autograd.grad(out, inputs, create_graph=True)
        (out + g.pow(2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert_close(grads[1], grads[0])


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_rescale_and_mixed_adapter_names_equal_eager(fullgraph):
    """torch.compile'd accelerated model: a changed scale (peft's rescale_adapter_scale) gives eager peft's logits
    with and without fullgraph, and so do adapter_names= batches (without: peft's own forward cannot be traced
    whole there)."""
    from peft.helpers import rescale_adapter_scale

    model, fast = two_adapter_pair("llama")
    model.eval(), fast.eval()
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=fullgraph)
    with torch.no_grad():
        for step in range(3):
            if step == 1:
                with rescale_adapter_scale(model, 0.5), rescale_adapter_scale(fast, 0.5):
                    assert rel_err(compiled(IDS).logits, model(IDS).logits) <= FP32
            else:
                assert rel_err(compiled(IDS).logits, model(IDS).logits) <= FP32
        if not fullgraph:  # peft registers hooks inside its forward for adapter_names=, which fullgraph refuses
            names = ["default", "other", "__base__"]
            got = compiled(IDS, adapter_names=names).logits
            assert rel_err(got, model(IDS, adapter_names=names).logits) <= FP32
