"""Bad input to the op is a clear ValueError naming the argument and shapes, raised before any kernel."""

import subprocess
import sys

import pytest
import torch

import fastlora
from fastlora import lora_linear


def good():
    return {"x": torch.randn(3, 8), "weight": torch.randn(12, 8), "bias": torch.randn(12),
            "lora_A": torch.randn(2, 8, requires_grad=True), "lora_B": torch.zeros(12, 2, requires_grad=True),
            "scale": 1.0}


@pytest.mark.parametrize(("change", "message"), [
    ({"x": torch.randn(3, 9)}, r"x's last dim must equal weight's in_features: x \(3, 9\), weight \(12, 8\)"),
    ({"weight": torch.randn(12, 8, 1)}, r"weight must be 2-D \(out, in\), got shape \(12, 8, 1\)"),
    ({"bias": torch.randn(11)}, r"bias must have shape \(12,\) to match weight \(12, 8\), got \(11,\)"),
    ({"lora_A": torch.randn(2, 7)}, r"lora_A must be \(R, 8\) to match weight \(12, 8\), got \(2, 7\)"),
    ({"lora_B": torch.randn(12, 3)}, r"lora_B must have shape \(12, 2\) .* got \(12, 3\)"),
    ({"lora_B": torch.randn(12, 2, dtype=torch.float64)}, "lora_B is torch.float64 on cpu but x is torch.float32"),
    ({"x": torch.ones(3, 8, dtype=torch.int64), "weight": torch.ones(12, 8, dtype=torch.int64),
      "bias": None, "lora_A": torch.ones(2, 8, dtype=torch.int64), "lora_B": torch.ones(12, 2, dtype=torch.int64)},
     "x must be one of float64, float32, float16, bfloat16, got torch.int64"),
    ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\), got 1.0"),
    ({"dropout_p": -0.5}, r"dropout_p must be in \[0, 1\), got -0.5"),
    ({"scale": float("nan")}, "scale must be a finite number, got nan"),
    ({"slices": [True, True, True, True, True]}, r"slices \[True, True, True, True, True\] must enable"),
    ({"slices": [True, False, True]}, r"lora_B must have shape \(8, 1\) for weight \(12, 8\), lora_A \(2, 8\) "
     r"and slices \[True, False, True\], got \(12, 2\)"),
    ({"slices": [True, False, True], "lora_A": torch.randn(3, 8)}, r"lora_A's rows 3 must be rank x 2 enabled"),
])
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_bad_arguments_name_the_argument_and_shapes(change, message, mode):
    """The same error in training, in eval mode and without autograd (where the cpu backend checks the arguments
    itself and the op only words its error), changing no tensor and not the random state."""
    args = good() | change | ({"training": False} if mode == "eval" else {})
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=message), torch.set_grad_enabled(mode != "no_grad"):
        lora_linear(**args)
    assert all(torch.equal(before[k], v) for k, v in args.items() if isinstance(v, torch.Tensor))
    assert torch.equal(torch.get_rng_state(), rng)


def test_an_inference_call_on_the_cpu_backend_leaves_the_checks_to_the_extension(monkeypatch):
    """No-grad, no dropout: the extension checks every argument, so the op's own checks run only to word an error."""
    pytest.importorskip("fastlora.ops.cpu", reason="the cpu backend is unavailable", exc_type=ImportError)
    import fastlora.ops as ops
    calls = []
    check = ops.args.check
    monkeypatch.setattr(ops.args, "check", lambda *a, **k: calls.append(1) or check(*a, **k))
    args = good()
    with torch.no_grad():
        want = ops.lora_linear(**args, dropout_p=0.1, training=False)
        assert not calls
        torch.testing.assert_close(want, args["x"] @ args["weight"].T + args["bias"])
        ops.lora_linear(**args, dropout_p=0.1)  # dropout: the seed is drawn after the op's checks
        assert len(calls) == 1
        with pytest.raises(ValueError, match="lora_A must be"):
            ops.lora_linear(**args | {"lora_A": torch.randn(2, 7)}, training=False)
        assert len(calls) == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"scale": torch.tensor(2.0)}, "scale must be a finite number, got tensor"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"dropout_p": 2.0}, r"dropout_p must be in \[0, 1\), got 2.0"),
])
def test_bad_arguments_are_refused_in_eval_mode_too(change, message):
    with pytest.raises(ValueError, match=message), torch.no_grad():
        lora_linear(**good() | change, training=False)


def test_trainable_base_weight_is_refused_in_backward():
    args = good()
    args["weight"].requires_grad_()
    y = lora_linear(**args)
    with pytest.raises(RuntimeError, match="keeps weight and bias frozen"):
        y.sum().backward()


def test_backends_report_availability_and_reasons():
    table = fastlora.backends()
    assert list(table) == ["reference", "cpu", "triton"]
    assert table["reference"].available
    for status in table.values():
        assert status.available or status.reason


def test_unknown_forced_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTLORA_BACKEND='cuda-magic' is not one of reference, cpu, triton"):
        lora_linear(**good())


def test_forced_backend_that_cannot_take_the_tensors_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "cpu")
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in good().items()}
    with pytest.raises(RuntimeError, match="FASTLORA_BACKEND=cpu"):
        lora_linear(**args)


def test_python_m_fastlora_prints_the_backend_table():
    """One row per backend, saying what fastlora.backends() says in this environment (the reference always yes)."""
    out = subprocess.run([sys.executable, "-m", "fastlora"], capture_output=True, text=True, check=True).stdout
    assert f"torch {torch.__version__}" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["backend", "available", "reason"])
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in lines[header + 1:]}
    expected = {name: ["yes"] if status.available else ["no", status.reason]
                for name, status in fastlora.backends().items()}
    assert rows == expected
    assert set(rows) == {"reference", "cpu", "triton"} and rows["reference"] == ["yes"]


def test_a_backend_that_breaks_on_import_is_reported_not_fatal(monkeypatch):
    from fastlora.ops import dispatch

    def broken(name):
        raise AttributeError("module 'fastlora._C' has no attribute 'cpu_vendor'")

    dispatch.load.cache_clear()
    monkeypatch.setattr(dispatch.importlib, "import_module", broken)
    try:
        table = dispatch.backends()
        assert not table["cpu"].available and "AttributeError" in table["cpu"].reason
    finally:
        monkeypatch.undo()
        dispatch.load.cache_clear()


@pytest.mark.parametrize(("seed", "message"), [
    (2**63, r"seed must be an integer in \[-2\*\*63, 2\*\*63\) \(int64\), got 9223372036854775808"),
    (-2**63 - 1, r"seed must be an integer in .* got -9223372036854775809"),
    (1.5, r"seed must be an integer in .* got 1.5"),
    (torch.tensor([1, 2]), r"seed must be an integer or a one-element integer tensor, got torch.int64 tensor of shape"),
    (torch.tensor(1.0), r"seed must be an integer or a one-element integer tensor, got torch.float32"),
])
def test_bad_dropout_seed_is_a_clear_error(seed, message):
    with pytest.raises(ValueError, match=message):
        lora_linear(**good(), dropout_p=0.1, seed=seed)


@pytest.mark.parametrize("seed", [2**63 - 1, -2**63, torch.tensor([5]), torch.tensor(5, dtype=torch.int32)])
def test_any_int64_seed_is_accepted(seed):
    assert lora_linear(**good(), dropout_p=0.1, seed=seed).shape == (3, 12)


def test_dispatch_asks_each_backend_which_devices_and_dtypes_it_takes():
    """One rule list: fp64 on a CUDA device goes to the reference (the triton backend takes fp32/fp16/bf16 only),
    fp16 on the CPU to the reference, fp32 on the CPU to the cpu backend where it is available."""
    from fastlora.ops import dispatch
    assert dispatch._choose(torch.device("cuda"), torch.float64).NAME == "reference"
    assert dispatch._choose(torch.device("cpu"), torch.float16).NAME == "reference"
    expected = "cpu" if fastlora.backends()["cpu"].available else "reference"
    assert expected == dispatch._choose(torch.device("cpu"), torch.float32).NAME
    for name, status in fastlora.backends().items():
        if status.available:
            module = dispatch.load(name)
            assert isinstance(module, dispatch.Backend) and name == module.NAME
            assert torch.float64 not in module.DTYPES or name == "reference"


def test_a_forced_backend_names_what_it_takes(monkeypatch):
    from fastlora.ops import dispatch
    monkeypatch.setenv("FASTLORA_BACKEND", "cpu")
    if fastlora.backends()["cpu"].available:
        with pytest.raises(RuntimeError, match=r"FASTLORA_BACKEND=cpu: the cpu backend takes float32 tensors on cpu, "
                                               r"got torch.float64 on cpu"):
            dispatch._choose(torch.device("cpu"), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64])
@pytest.mark.parametrize("mode", ["train", "no_grad"])
def test_float_dtypes_no_backend_takes_are_refused_up_front(dtype, mode):
    """The same rule for the fast path and the checked one: an fp8 (or complex) x is a ValueError naming x's dtype,
    raised before any backend runs, single-adapter and mixed alike."""
    args = {k: (v.detach().to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in good().items()}
    with pytest.raises(ValueError, match=f"x must be one of float64, float32, float16, bfloat16, got {dtype}"), \
            torch.set_grad_enabled(mode == "train"):
        lora_linear(**args)
    with pytest.raises(ValueError, match=f"adapter 0: x must be one of .* got {dtype}"):
        fastlora.lora_linear_mixed(args["x"], args["weight"], args["bias"], [args["lora_A"]], [args["lora_B"]], [1.0],
                                   torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("transform", ["vmap", "jvp", "grad"])
def test_torch_func_transforms_are_refused_not_computed(transform):
    """The op's gradients come from torch.autograd: under torch.func's transforms it stops with an error that says
    so (the cpu backend's, or PyTorch's for an autograd.Function), never with a number."""
    g = good()
    x, w, b, A, B = g["x"], g["weight"], g["bias"], g["lora_A"].detach(), g["lora_B"].detach()
    with torch.no_grad():
        B.normal_()
    if transform == "vmap":
        with pytest.raises(ValueError, match=r"x has no storage: .*torch\.func transform"):
            torch.func.vmap(lambda row: lora_linear(row, w, b, A, B, 2.0))(x.unsqueeze(1))
    elif transform == "jvp":
        with pytest.raises(ValueError, match=r"has no storage: .*torch\.func transform"):
            torch.func.jvp(lambda a: lora_linear(x, w, b, a, B, 2.0), (A,), (torch.ones_like(A),))
    else:
        with pytest.raises(RuntimeError, match="functorch transforms"):
            torch.func.grad(lambda a: lora_linear(x, w, b, a, B, 2.0).sum())(A)
