"""Tests specific to the C++ cpu backend: kernel paths, layouts, threads, robustness, bad calls."""

import importlib
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOLERANCE, float64_reference, rel_err

from fastlora.ops import reference
from fastlora.ops.reference import dropout_keep_mask, dropout_threshold

cpu = pytest.importorskip("fastlora.ops.cpu", reason="the cpu backend is unavailable", exc_type=ImportError)


def _torch_threads(n: int):
    """torch (and so the extension) on n threads, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    yield from _torch_threads(2)


@pytest.fixture
def one_thread():
    """Tiny calls on one thread skip thread wake-ups."""
    yield from _torch_threads(1)


@pytest.fixture(params=cpu.supported_isas())
def isa(request):
    """Each instruction set this CPU supports, selected in turn."""
    before = cpu.isa()
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(before)


@pytest.fixture(params=cpu.GEMMS)
def gemm(request):
    """Each GEMM for the base product, selected in turn."""
    before = cpu.gemm()
    cpu.set_gemm(request.param)
    yield request.param
    cpu.set_gemm(before)


def make(m, n_in, n_out, rank, conv1d=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n_in, generator=gen)
    weight = torch.randn(n_out, n_in, generator=gen) * n_in**-0.5
    if conv1d:  # the (out, in) view of a contiguous (in, out) buffer, as a transformers Conv1D holds it
        weight = weight.t().contiguous().t()
    bias = torch.randn(n_out, generator=gen)
    lora_A = torch.randn(rank, n_in, generator=gen) * n_in**-0.5
    lora_B = torch.randn(n_out, rank, generator=gen) * rank**-0.5
    return x, weight, bias, lora_A, lora_B


def check_forward_backward(x, weight, bias, lora_A, lora_B, scale, p, seed, tol=TOLERANCE[torch.float32]):
    """The backend's forward and backward against the float64 reference with its explicit mask."""
    seed_t = torch.tensor(seed)
    y = cpu.forward(x, weight, bias, lora_A, lora_B, scale, p, seed_t)
    grad = torch.randn_like(y)
    dx, dA, dB = cpu.backward(grad, x, weight, lora_A, lora_B, scale, p, seed_t, (True, True, True))
    y_ref, (x64, a64, b64) = float64_reference(x.requires_grad_(), weight, bias, lora_A.requires_grad_(),
                                               lora_B.requires_grad_(), scale, p, seed)
    y_ref.backward(grad.double())
    for name, got, want in (("y", y, y_ref), ("dx", dx, x64.grad), ("dA", dA, a64.grad), ("dB", dB, b64.grad)):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert rel_err(got, want) <= tol, f"{name} error {rel_err(got, want):.2e}"


@pytest.mark.parametrize("m", [1, 3, 8, 130, 700], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_every_kernel_path_matches_float64(isa, gemm, two_threads, m, conv1d):
    """Streaming (M <= 8), column-split and row-split paths, both weight layouts, both GEMMs, every ISA."""
    check_forward_backward(*make(m, 97, 203, 5, conv1d=conv1d, seed=m), scale=1.5, p=0.1, seed=m + 7)


@pytest.mark.parametrize(("m", "rank"), [(259, 1), (259, 17), (4096, 64)])
def test_ranks_and_sizes_off_the_vector_width(two_threads, m, rank):
    check_forward_backward(*make(m, 131, 67, rank, seed=rank), scale=0.7, p=0.25, seed=3)


@pytest.mark.parametrize("m", [1, 130, 700])
def test_row_strided_x(two_threads, gemm, m):
    """x with a row stride wider than its rows (a column slice, which the backend passes uncopied)."""
    x, weight, bias, lora_A, lora_B = make(m, 40, 72, 4, seed=m)
    wide = torch.randn(m, 100)
    wide[:, :40] = x
    x_view = wide[:, :40]
    assert x_view.stride() == (100, 1)
    check_forward_backward(x_view, weight, bias, lora_A, lora_B, scale=1.0, p=0.1, seed=m)


def test_dropout_mask_is_the_reference_mask_bit_for_bit(isa):
    """With W = 0, A = B = I and no bias, y is exactly dropout(x): its zeros are the dropped elements."""
    n, p, seed = 75, 0.3, (5 << 32) + 17
    x = torch.rand(301, n) + 0.5  # no zeros of its own
    eye = torch.eye(n)
    y = cpu.forward(x, torch.zeros(n, n), None, eye, eye, 1.0, p, torch.tensor(seed))
    keep = dropout_keep_mask(torch.tensor(seed), 301, n, p, torch.device("cpu"))
    assert torch.equal(y != 0, keep)
    torch.testing.assert_close(y, x * keep / (1 - p), rtol=1e-6, atol=0)


def test_isa_and_gemm_overrides():
    assert cpu.supported_isas()[0] == "portable" and cpu.isa() in cpu.supported_isas()
    with pytest.raises(ValueError, match="not available"):
        cpu.set_isa("sse9")
    assert cpu.gemm() in cpu.GEMMS
    with pytest.raises(ValueError, match="unknown GEMM"):
        cpu.set_gemm("atlas")


def test_missing_extension_is_an_import_error_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastlora._C", None)
    monkeypatch.delitem(sys.modules, "fastlora.ops.cpu")
    with pytest.raises(ImportError, match=r"fastlora\._C"):
        importlib.import_module("fastlora.ops.cpu")


def test_concurrent_python_threads_get_correct_results(two_threads, gemm):
    cases = [make(150 + 40 * i, 64, 96, 4, conv1d=i % 2 == 1, seed=i) for i in range(4)]
    expected = [reference.forward(*c, 2.0, 0.2, torch.tensor(i)) for i, c in enumerate(cases)]
    errors = []

    def worker(i):
        for _ in range(30):
            y = cpu.forward(*cases[i], 2.0, 0.2, torch.tensor(i))
            if rel_err(y, expected[i]) > 1e-5:
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_repeated_calls_do_not_grow_memory(one_thread):
    x, weight, bias, lora_A, lora_B = make(64, 48, 80, 4)
    seed = torch.tensor(1)
    grad = torch.randn(64, 80)

    def calls(n):
        for _ in range(n):
            cpu.forward(x, weight, bias, lora_A, lora_B, 1.0, 0.1, seed)
            cpu.backward(grad, x, weight, lora_A, lora_B, 1.0, 0.1, seed, (True, True, True))

    calls(500)  # allocator and pool warm-up
    before = _rss_bytes()
    calls(5000)
    assert _rss_bytes() - before < 8 * 2**20


def test_nan_and_inf_propagate_as_in_the_reference(two_threads, gemm):
    x, weight, bias, lora_A, lora_B = make(140, 40, 24, 4)
    x[3, 5], x[77, 0], x[100, 39] = float("nan"), float("inf"), float("-inf")
    seed = torch.tensor(9)
    grad = torch.randn(140, 24)
    grad[10, 2] = float("nan")
    for p in (0.0, 0.5):
        got = (cpu.forward(x, weight, bias, lora_A, lora_B, 1.0, p, seed),
               *cpu.backward(grad, x, weight, lora_A, lora_B, 1.0, p, seed, (True, True, True)))
        want = (reference.forward(x, weight, bias, lora_A, lora_B, 1.0, p, seed),
                *reference.backward(grad, x, weight, lora_A, lora_B, 1.0, p, seed, (True, True, True)))
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isposinf(), w.isposinf())
            assert torch.equal(g.isneginf(), w.isneginf())


def _good_args():
    m, n_in, n_out, rank = 5, 6, 7, 2
    return dict(out=torch.zeros(m, n_out), x=torch.ones(m, n_in), weight=torch.ones(n_out, n_in),
                bias=torch.ones(n_out), lora_A=torch.ones(rank, n_in), lora_B=torch.ones(n_out, rank),
                scale=1.0, dropout_p=0.1, threshold=dropout_threshold(0.1), seed=3, threads=2)


BAD_FORWARD_ARGS = {  # (the bad arguments, what the error must say)
    "numpy x": (dict(x=np.ones((5, 6), np.float32)), "x must be a torch.Tensor, got numpy.ndarray"),
    "float64 x": (dict(x=torch.ones(5, 6, dtype=torch.float64)), "x must be float32, got torch.float64"),
    "x on meta": (dict(x=torch.ones(5, 6, device="meta")), "x must be on the CPU, got meta"),
    "negated x": (dict(x=torch.ones(5, 6, dtype=torch.complex64).conj().imag), "x is a negated view"),
    "sparse x": (dict(x=torch.ones(5, 6).to_sparse()), "x: RuntimeError: .*(storage|strides)"),
    "1-D x": (dict(x=torch.ones(6)), r"x must have 2 dims, got shape torch.Size\(\[6\]\)"),
    "x in mismatch": (dict(x=torch.ones(5, 4)), r"weight must be \(out, 4\)"),
    "x column stride": (dict(x=torch.ones(5, 12)[:, ::2]), "x must be row-major"),
    "weight no unit stride": (dict(weight=torch.ones(14, 12)[::2, ::2]), "weight must be row- or column-major"),
    "weight out mismatch": (dict(weight=torch.ones(6, 6)), r"lora_B must have shape \(6, 2\)"),
    "bias shape": (dict(bias=torch.ones(3)), r"bias must have shape \(7,\), got \(3,\)"),
    "lora_A shape": (dict(lora_A=torch.ones(2, 5)), r"lora_A must have shape \(2, 6\)"),
    "lora_A rank 0": (dict(lora_A=torch.ones(0, 6), lora_B=torch.ones(7, 0)), "at least one row"),
    "lora_B shape": (dict(lora_B=torch.ones(7, 3)), r"lora_B must have shape \(7, 2\)"),
    "lora_B not contiguous": (dict(lora_B=torch.ones(2, 7).T), "lora_B must be C-contiguous"),
    "out shape": (dict(out=torch.zeros(5, 6)), r"out must have shape \(5, 7\)"),
    "out overlapping": (dict(out=torch.zeros(7).expand(5, 7)), "out must be C-contiguous"),
    "None weight": (dict(weight=None), "weight must be a torch.Tensor, got NoneType"),
    "dropout 1": (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    "nan scale": (dict(scale=float("nan")), "scale must be finite"),
    "threshold range": (dict(threshold=2**40), "threshold must be an int32"),
    "zero threads": (dict(threads=0), "threads must be >= 1"),
}


@pytest.mark.parametrize("bad", BAD_FORWARD_ARGS, ids=list(BAD_FORWARD_ARGS))
def test_malformed_direct_calls_raise_naming_the_argument(bad):
    args = _good_args()
    cpu._C.forward(**args)  # the good call works
    changes, message = BAD_FORWARD_ARGS[bad]
    args.update(changes)
    with pytest.raises((ValueError, TypeError), match=message):
        cpu._C.forward(**args)


def test_malformed_backward_calls_raise():
    a = _good_args()
    common = dict(x=a["x"], weight=a["weight"], lora_A=a["lora_A"], lora_B=a["lora_B"], scale=1.0,
                  dropout_p=0.1, threshold=a["threshold"], seed=1, threads=2)
    grads = dict(dx=torch.zeros(5, 6), dA=torch.zeros(2, 6), dB=torch.zeros(7, 2))
    cpu._C.backward(**grads, grad_out=torch.ones(5, 7), **common)
    bad_args = [(dict(grad_out=torch.ones(5, 6)), r"grad_out must be \(5, 7\)"),
                (dict(dx=torch.zeros(6, 5)), r"dx must have shape \(5, 6\)"),
                (dict(dA=torch.zeros(3, 6)), r"dA must have shape \(2, 6\)"),
                (dict(dB=torch.zeros(7, 2, dtype=torch.float64)), "dB must be float32")]
    for bad, message in bad_args:
        args = dict(grads, grad_out=torch.ones(5, 7), **common)
        args.update(bad)
        with pytest.raises((ValueError, TypeError), match=message):
            cpu._C.backward(**args)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_extension_shares_pytorchs_openmp_runtime():
    """One libgomp in the process: the extension's parallel loops use PyTorch's thread team."""
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "libgomp" in line or "libiomp" in line or "libomp" in line}
    assert len(runtimes) == 1, runtimes
