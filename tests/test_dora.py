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


# -- the layer, the model API and peft's format ---------------------------------------------------------------------

def _tiny(family: str):
    from conftest import tiny_gpt2
    from test_model_families import tiny_llama
    return tiny_gpt2() if family == "gpt2" else tiny_llama("llama")


def _randomize(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_magnitude" in name:
                param.mul_(torch.rand(param.shape, generator=gen) + 0.5)
    return model


IDS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(4))


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    def own_name(name: str) -> str:  # peft's and fastlora's names of the same parameter, made equal
        return name.replace("base_model.model.", "").replace(".default", "").replace("adapters.", "") \
            .removesuffix(".weight")
    grads = {own_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_peft_dora_adapter_loads_into_fastlora_and_trains_alike(family, tmp_path):
    """peft's DoRA adapter (Conv1D with fan_in_fan_out, or nn.Linear; rsLoRA and rank/alpha patterns) loaded into
    fastlora: equal logits and equal gradients of every A, B and magnitude; saved back, it loads in peft alike."""
    import fastlora
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, use_rslora=True,
                             fan_in_fan_out=family == "gpt2", rank_pattern={targets[0]: 2},
                             alpha_pattern={targets[1]: 3})
    reference = _randomize(peft.get_peft_model(_tiny(family), config))
    reference.save_pretrained(tmp_path / "peft")
    model = fastlora.load_adapter(_tiny(family), tmp_path / "peft")
    want_logits, want = _loss_and_grads(reference.train())
    got_logits, got = _loss_and_grads(model.train())
    assert rel_err(got_logits, want_logits) <= FP32
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], want[name]) <= FP32, name
    fastlora.save_adapter(model, tmp_path / "fast")
    back = peft.PeftModel.from_pretrained(_tiny(family), tmp_path / "fast").eval()
    with torch.no_grad():
        assert rel_err(back(IDS).logits, reference.eval()(IDS).logits) <= FP32


def test_inject_with_use_dora_starts_as_the_base_model_and_merges_as_peft(tmp_path):
    import fastlora
    base = _tiny("llama").eval()
    model = fastlora.inject(_tiny("llama"), fastlora.LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                                                use_dora=True)).eval()
    with torch.no_grad():
        assert rel_err(model(IDS).logits, base(IDS).logits) <= FP32  # B = 0 and m = |W|: the base model
        _randomize(model)
        unmerged = model(IDS).logits
        before = {n: p.clone() for n, p in model.state_dict().items()}
        fastlora.merge(model)
        assert rel_err(model(IDS).logits, unmerged) <= FP32
        fastlora.unmerge(model)
        assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # exact, bit for bit
        fastlora.merge(model, exact=False)
        assert rel_err(model(IDS).logits, unmerged) <= FP32
        fastlora.unmerge(model)
        assert all(rel_err(p, before[n]) <= FP32 for n, p in model.state_dict().items())
    fastlora.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(_tiny("llama"), tmp_path).eval()
    with torch.no_grad():
        merged = loaded.merge_and_unload()(IDS).logits
        assert rel_err(merged, unmerged) <= FP32


def test_dora_on_q_and_v_slices_keeps_k_the_base_output_and_loads_in_peft(tmp_path, monkeypatch):
    """GPT-2's fused c_attn with DoRA on q and v: k's features are the base layer's output (bit for bit on the
    reference backend, whose base product is the layer's own addmm); the adapter saves as peft's whole-module DoRA
    (block B, k's magnitude = its norms) and peft gives the same logits."""
    from conftest import tiny_gpt2

    import fastlora
    model = fastlora.inject(tiny_gpt2(), fastlora.LoraConfig(r=2, alpha=4, target_modules=["c_attn"],
                                                             slices={"c_attn": [True, False, True]}, use_dora=True))
    _randomize(model).eval()
    layer = model.transformer.h[0].attn.c_attn
    assert layer.adapter().lora_magnitude_vector.shape == (64,)
    x = torch.randn(3, 32)
    with torch.no_grad():
        y, base = layer(x), layer.base_layer(x)
        assert rel_err(y[:, 32:64], base[:, 32:64]) <= FP32 and rel_err(y[:, :32], base[:, :32]) > 1e-3
        monkeypatch.setenv("FASTLORA_BACKEND", "reference")
        assert torch.equal(layer(x)[:, 32:64], base[:, 32:64])
        monkeypatch.delenv("FASTLORA_BACKEND")
    fastlora.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(loaded(IDS).logits, model(IDS).logits) <= FP32
    again = fastlora.load_adapter(tiny_gpt2(), tmp_path).eval()
    assert again.transformer.h[0].attn.c_attn.adapter().slices == [True, False, True]
    with torch.no_grad():
        assert rel_err(again(IDS).logits, model(IDS).logits) <= FP32


def test_accelerate_fuses_peft_dora_layers_with_peft_logits_and_gradients():
    import copy

    import fastlora
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    model = _randomize(peft.get_peft_model(_tiny("llama"), config))
    fast = copy.deepcopy(model)
    report = fastlora.accelerate(fast, strict=True)
    assert len(report.fused) == sum(isinstance(m, peft.tuners.lora.Linear) for m in model.modules())
    want_logits, want = _loss_and_grads(model.train())
    got_logits, got = _loss_and_grads(fast.train())
    assert rel_err(got_logits, want_logits) <= FP32
    for name in want:
        assert rel_err(got[name], want[name]) <= FP32, name


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_a_mixed_batch_serves_dora_beside_lora_adapters(dropout):
    """Rows of a DoRA adapter, a LoRA adapter (with q,v-like slices) and the base alone in one batch: each row is
    its adapter's single-adapter output with the same mask, and every gradient (x, A, B, m) equals the sum over
    adapters of the single-adapter ops' on their own rows."""
    from fastlora import lora_linear_mixed
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 4, 12, generator=gen).requires_grad_()
    weight, bias = torch.randn(18, 12, generator=gen), torch.randn(18, generator=gen)
    A0, B0 = (torch.randn(3, 12, generator=gen) * 0.3).requires_grad_(), (torch.randn(18, 3, generator=gen) * 0.3)
    A1, B1 = (torch.randn(4, 12, generator=gen) * 0.3).requires_grad_(), (torch.randn(12, 2, generator=gen) * 0.3)
    m0 = (torch.rand(18, generator=gen) + 1).requires_grad_()
    B0.requires_grad_(), B1.requires_grad_()
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    slices1 = (True, False, True)
    y = lora_linear_mixed(x, weight, bias, [A0, A1], [B0, B1], [1.5, 0.7], ids, dropout, seed=5,
                          slices=[None, slices1], magnitudes=[m0, None])
    dy = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad(y, (x, A0, B0, m0, A1, B1), dy)
    alone = [lora_linear(x, weight, bias, A0, B0, 1.5, dropout, seed=5, magnitude=m0),
             lora_linear(x, weight, bias, A1, B1, 0.7, dropout, seed=5, slices=slices1),
             x @ weight.t() + bias]
    pick = torch.stack([alone[int(i)][row] for row, i in enumerate(ids)])  # -1: alone[2], the base
    want = pick.detach()
    assert rel_err(y, want) <= FP32
    expected = torch.autograd.grad(pick, (x, A0, B0, m0, A1, B1), dy)
    for name, g, w in zip(("x", "A0", "B0", "m0", "A1", "B1"), grads, expected, strict=True):
        assert rel_err(g, w) <= FP32, name


def test_use_adapters_serves_a_dora_adapter_beside_a_lora_adapter():
    from conftest import tiny_gpt2

    import fastlora
    model = fastlora.inject(tiny_gpt2(), fastlora.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    fastlora.inject(model, fastlora.LoraConfig(r=2, alpha=4, target_modules=["c_attn"], use_dora=True),
                    adapter_name="dora")
    _randomize(model).eval()
    ids = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(1))
    names = ["dora", None, "default"]
    with torch.no_grad(), fastlora.use_adapters(model, names):
        mixed = model(ids).logits
    for row, name in enumerate(names):
        fastlora.set_adapter(model, name)
        with torch.no_grad():
            assert rel_err(mixed[row], model(ids[row:row + 1]).logits[0]) <= FP32, name
