"""Tests specific to the C++ cpu backend, single-adapter and mixed-batch: kernel paths, layouts, threads,
robustness, bad calls."""

import importlib
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOLERANCE, float64_dora, float64_reference, rel_err

import fastlora
from fastlora.ops import reference
from fastlora.ops.reference import dropout_keep_mask
from fastlora.ops.routing import AdapterRouting

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
    y = cpu.forward(x, weight, bias, lora_A, lora_B, scale, p, seed_t)[0]
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
    y = cpu.forward(x, torch.zeros(n, n), None, eye, eye, 1.0, p, torch.tensor(seed))[0]
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
    expected = [reference.forward(*c, 2.0, 0.2, torch.tensor(i))[0] for i, c in enumerate(cases)]
    errors = []

    def worker(i):
        for _ in range(30):
            y = cpu.forward(*cases[i], 2.0, 0.2, torch.tensor(i))[0]
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
            cpu.forward(x, weight, bias, lora_A, lora_B, 1.0, 0.1, seed)[0]
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
        got = (cpu.forward(x, weight, bias, lora_A, lora_B, 1.0, p, seed)[0],
               *cpu.backward(grad, x, weight, lora_A, lora_B, 1.0, p, seed, (True, True, True)))
        want = (reference.forward(x, weight, bias, lora_A, lora_B, 1.0, p, seed)[0],
                *reference.backward(grad, x, weight, lora_A, lora_B, 1.0, p, seed, (True, True, True)))
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isposinf(), w.isposinf())
            assert torch.equal(g.isneginf(), w.isneginf())


def _freed(t):
    """t with its storage resized to nothing, as FSDP frees a parameter it gathered."""
    t.untyped_storage().resize_(0)
    return t


def _good_args():
    m, n_in, n_out, rank = 5, 6, 7, 2
    return dict(x=torch.ones(m, n_in), weight=torch.ones(n_out, n_in), bias=torch.ones(n_out),
                lora_A=torch.ones(rank, n_in), lora_B=torch.ones(n_out, rank), scale=1.0, dropout_p=0.1, seed=3,
                threads=2)


BAD_FORWARD_ARGS = {  # (the bad arguments, what the error must say)
    "numpy x": (dict(x=np.ones((5, 6), np.float32)), "x must be a torch.Tensor, got numpy.ndarray"),
    "float64 x": (dict(x=torch.ones(5, 6, dtype=torch.float64)), "x must be float32, got torch.float64"),
    "x on meta": (dict(x=torch.ones(5, 6, device="meta")), "x must be on the CPU, got meta"),
    "negated x": (dict(x=torch.ones(5, 6, dtype=torch.complex64).conj().imag), "x is a negated view"),
    "sparse x": (dict(x=torch.ones(5, 6).to_sparse()), "x must be a dense .strided. tensor, got layout torch.sparse"),
    "freed weight": (dict(weight=_freed(torch.ones(7, 6))), "weight addresses 168 bytes of a storage of 0 .freed"),
    "1-D x": (dict(x=torch.ones(6)), r"x must have 2 dims, got shape torch.Size\(\[6\]\)"),
    "x in mismatch": (dict(x=torch.ones(5, 4)), r"weight must be \(out, 4\)"),
    "weight out mismatch": (dict(weight=torch.ones(6, 6)), r"lora_B must have shape \(6, 2\)"),
    "bias shape": (dict(bias=torch.ones(3)), r"bias must have shape \(7,\), got \(3,\)"),
    "lora_A shape": (dict(lora_A=torch.ones(2, 5)), r"lora_A must have shape \(2, 6\)"),
    "lora_A rank 0": (dict(lora_A=torch.ones(0, 6), lora_B=torch.ones(7, 0)), "at least one row"),
    "lora_B shape": (dict(lora_B=torch.ones(7, 3)), r"lora_B must have shape \(7, 2\)"),
    "None weight": (dict(weight=None), "weight must be a torch.Tensor, got NoneType"),
    "dropout 1": (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    "nan scale": (dict(scale=float("nan")), "scale must be finite"),
    "zero threads": (dict(threads=0), "threads must be >= 1"),
}




def test_outputs_are_made_on_the_cpu_whatever_the_default_device():
    x, weight, bias, lora_A, lora_B = make(5, 6, 7, 2)
    seed = torch.tensor(1)
    want = cpu.forward(x, weight, bias, lora_A, lora_B, 1.0, 0.1, seed)[0]
    want_grads = cpu.backward(want, x, weight, lora_A, lora_B, 1.0, 0.1, seed, (True, True, True))
    with torch.device("meta"):
        y = cpu.forward(x, weight, bias, lora_A, lora_B, 1.0, 0.1, seed)[0]
        grads = cpu.backward(want, x, weight, lora_A, lora_B, 1.0, 0.1, seed, (True, True, True))
    assert torch.equal(y, want)
    for got, expected in zip(grads, want_grads, strict=True):
        assert torch.equal(got, expected)


def test_malformed_backward_calls_raise():
    a = _good_args()
    del a["bias"]
    good = dict(a, grad_out=torch.ones(5, 7), need_dx=True, need_dA=False, need_dB=True)
    dx, dA, dB = cpu._C.backward(**good)
    assert dx.shape == (5, 6) and dA is None and dB.shape == (7, 2)
    bad_args = [(dict(grad_out=torch.ones(5, 6)), r"grad_out must be \(5, 7\)"),
                (dict(grad_out=torch.ones(5, 7, dtype=torch.float64)), "grad_out must be float32"),
                (dict(lora_B=torch.ones(7, 3)), r"lora_B must have shape \(7, 2\)")]
    for bad, message in bad_args:
        with pytest.raises((ValueError, TypeError), match=message):
            cpu._C.backward(**(good | bad))


def test_arguments_in_other_layouts_are_copied_not_refused(two_threads, gemm):
    """x and grad_out without unit column stride, a weight neither row- nor column-major, non-contiguous
    bias, lora_A and lora_B: the extension copies them and computes what it computes on contiguous ones."""
    x, weight, bias, lora_A, lora_B = make(130, 12, 14, 3, seed=4)

    def spaced(t):  # t's values in a view with no unit stride
        wide = torch.zeros(*(2 * d for d in t.shape))
        view = wide[(slice(None, None, 2),) * t.dim()]
        view.copy_(t)
        return view

    strided = [spaced(t) for t in (x, weight, bias, lora_A, lora_B)]
    assert not any(t.is_contiguous() for t in strided)
    for m in (130, 3):
        args = [t[:m] for t in strided[:1]] + strided[1:]
        check_forward_backward(*args, scale=1.5, p=0.1, seed=m)
        grad = torch.randn(m, 14)
        seed = torch.tensor(m)
        want = cpu.backward(grad, x[:m], weight, lora_A, lora_B, 1.5, 0.1, seed, (True, True, True))
        got = cpu.backward(spaced(grad), *args[:2], *args[3:], 1.5, 0.1, seed, (True, True, True))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_extension_shares_pytorchs_openmp_runtime():
    """One libgomp in the process: the extension's parallel loops use PyTorch's thread team."""
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "libgomp" in line or "libiomp" in line or "libomp" in line}
    assert len(runtimes) == 1, runtimes


# Mixed batches (each row its own adapter): forward_mixed / backward_mixed against the reference's.

def make_mixed(m, n_in, n_out, ranks, conv1d=False, lora_col_major=False, seed=0):
    """x, weight, bias and one (A, B) per rank; with lora_col_major, A and B are transposed views."""
    x, weight, bias, _, _ = make(m, n_in, n_out, 1, conv1d=conv1d, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    As = [torch.randn(r, n_in, generator=gen) * n_in**-0.5 for r in ranks]
    Bs = [torch.randn(n_out, r, generator=gen) * r**-0.5 for r in ranks]
    if lora_col_major:
        As, Bs = [A.t().contiguous().t() for A in As], [B.t().contiguous().t() for B in Bs]
    return x, weight, bias, As, Bs


def routed(ids, adapters, x):
    """The routing of a mixed batch, as the op hands it to the backends."""
    return AdapterRouting(ids, adapters).rows(x.shape[:-1], x.device)


def check_mixed(x, weight, bias, As, Bs, ids, scales, ps, seed=11, need_dx=True, need_lora=None,
                tol=TOLERANCE[torch.float32]):
    """The backend's forward_mixed and backward_mixed against the reference's in float64."""
    need_lora = [True] * len(As) if need_lora is None else need_lora
    seed_t = torch.tensor(seed)
    rows = routed(ids, len(As), x)
    y = cpu.forward_mixed(x, weight, bias, As, Bs, scales, ps, rows, seed_t)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    dx, dAs, dBs = cpu.backward_mixed(grad, x, weight, As, Bs, scales, ps, rows, seed_t, need_dx, need_lora)
    f64 = [t.double() for t in As], [t.double() for t in Bs]
    y_ref = reference.forward_mixed(x.double(), weight.double(), bias.double() if bias is not None else None, *f64,
                                    scales, ps, rows, seed_t)
    dx_ref, dAs_ref, dBs_ref = reference.backward_mixed(grad.double(), x.double(), weight.double(), *f64, scales, ps,
                                                        rows, seed_t, need_dx, need_lora)
    pairs = [("y", y, y_ref)] + ([("dx", dx, dx_ref)] if need_dx else [])
    assert (dx is None) == (not need_dx)
    for a, (dA, dB, dA_ref, dB_ref) in enumerate(zip(dAs, dBs, dAs_ref, dBs_ref, strict=True)):
        assert (dA is None) == (dA_ref is None) and (dB is None) == (dB_ref is None), f"adapter {a}"
        if dA is not None:
            pairs += [(f"dA[{a}]", dA, dA_ref), (f"dB[{a}]", dB, dB_ref)]
    for name, got, want in pairs:
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        if want.numel():
            assert rel_err(got, want) <= tol, f"{name} error {rel_err(got, want):.2e}"


@pytest.fixture(params=[1, 2], ids=["1t", "2t"])
def threads(request):
    yield from _torch_threads(request.param)


@pytest.mark.parametrize("m", [1, 5, 8, 9, 40, 600], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("layout", ["linear", "conv1d", "col-major-lora"])
def test_mixed_every_kernel_path_matches_the_reference(isa, gemm, threads, m, layout):
    """The fused decode pass (M <= 8), sgemv (few rows an adapter), transposed-B and column-major-B updates,
    column and row splits, every ISA and GEMM, 1 and 2 threads; ranks off the vector width, rows without an
    adapter, an adapter that no row names, dropout differing between adapters."""
    ranks = [16, 1, 17, 4, 64, 3]
    x, weight, bias, As, Bs = make_mixed(m, 97, 203, ranks, conv1d=layout == "conv1d",
                                         lora_col_major=layout == "col-major-lora", seed=m)
    ids = torch.randint(-1, len(ranks) - 1, (m,), generator=torch.Generator().manual_seed(m))  # none names the last
    ids[0] = 0  # M = 1: not rank 1, whose dA, dB would be a single dot product, too ill-conditioned for 1e-5
    check_mixed(x, weight, bias, As, Bs, ids, [1.5, 0.5, 2.0, 1.0, 0.25, 3.0], [0.1, 0.0, 0.3, 0.2, 0.0, 0.1])


@pytest.mark.parametrize("m", [1, 8, 64, 600], ids=lambda m: f"M{m}")
def test_mixed_many_adapters_of_mixed_ranks(gemm, threads, m):
    """64 adapters of ranks 1 to 64 spread over the rows; some need no gradients; no bias."""
    ranks = [1 + (7 * a) % 64 for a in range(64)]
    x, weight, _, As, Bs = make_mixed(m, 48, 80, ranks, seed=m)
    ids = torch.arange(m) * 37 % 64
    need = [a % 5 != 0 for a in range(64)]
    check_mixed(x, weight, None, As, Bs, ids, [0.5 + a / 32 for a in range(64)], [0.1 * (a % 3) for a in range(64)],
                need_lora=need)


@pytest.mark.parametrize("m", [3, 700], ids=lambda m: f"M{m}")
def test_mixed_backward_without_dx_or_lora_gradients(two_threads, gemm, m):
    """Each of dx and the adapters' gradients alone; one adapter's rows split between threads."""
    x, weight, bias, As, Bs = make_mixed(m, 64, 40, [8, 2])
    ids = torch.where(torch.arange(m) % 3 == 0, -1, torch.arange(m) % 2)
    check_mixed(x, weight, bias, As, Bs, ids, [2.0, 1.0], [0.2, 0.0], need_dx=False)
    check_mixed(x, weight, bias, As, Bs, ids, [2.0, 1.0], [0.2, 0.0], need_lora=[False, False])


def test_mixed_inputs_with_strides_and_edge_shapes(two_threads):
    """Row-strided x, strided adapter_ids, no rows, only rows without an adapter, no adapters at all."""
    x, weight, bias, As, Bs = make_mixed(150, 40, 72, [4, 8], seed=3)
    wide = torch.zeros(150, 100)
    wide[:, :40] = x
    ids = torch.arange(300).remainder(3).sub(1)[::2]
    assert not ids.is_contiguous()
    check_mixed(wide[:, :40], weight, bias, As, Bs, ids, [1.0, 2.0], [0.1, 0.2])
    check_mixed(x[:0], weight, bias, As, Bs, ids[:0], [1.0, 2.0], [0.1, 0.2])
    check_mixed(x[:9], weight, bias, As, Bs, torch.full((9,), -1), [1.0, 2.0], [0.1, 0.2])
    check_mixed(x[:9], weight, bias, [], [], torch.full((9,), -1), [], [])


def test_mixed_dropout_mask_is_the_reference_mask_bit_for_bit(isa):
    """With W = 0, A = B = I and no bias, row i is exactly dropout(x_i) with its adapter's p."""
    n, m, seed = 75, 301, (5 << 32) + 17
    x = torch.rand(m, n) + 0.5  # no zeros of its own
    eye = torch.eye(n)
    ps = [0.3, 0.0, 0.6]
    ids = torch.arange(m) % 3
    y = cpu.forward_mixed(x, torch.zeros(n, n), None, [eye] * 3, [eye] * 3, [1.0] * 3, ps, routed(ids, 3, x),
                          torch.tensor(seed))
    for a, p in enumerate(ps):
        rows = ids == a
        keep = dropout_keep_mask(torch.tensor(seed), m, n, p, torch.device("cpu"))[rows] if p else torch.ones(1)
        assert torch.equal(y[rows] != 0, keep.expand_as(y[rows]))
        torch.testing.assert_close(y[rows], x[rows] * keep / (1 - p), rtol=1e-6, atol=0)


def _good_mixed_args():
    m, n_in, n_out = 5, 6, 7
    return dict(x=torch.ones(m, n_in), weight=torch.ones(n_out, n_in),
                bias=torch.ones(n_out), lora_As=[torch.ones(2, n_in), torch.ones(3, n_in)],
                lora_Bs=[torch.ones(n_out, 2), torch.ones(n_out, 3)], scales=[1.0, 2.0], dropout_ps=[0.1, 0.0],
                adapter_ids=torch.tensor([0, -1, 1, 1, 0]), seed=3, threads=2)


BAD_MIXED_ARGS = {  # (the bad arguments, what the error must say)
    "As not a list": (dict(lora_As=torch.ones(2, 6)), "lora_As must be a list or tuple, got Tensor"),
    "Bs too few": (dict(lora_Bs=[torch.ones(7, 2)]),
                   r"lora_Bs must have one item per adapter \(2, as lora_As\), got 1"),
    "scales too many": (dict(scales=[1.0, 2.0, 3.0]), r"scales must have one item per adapter \(2, .*got 3"),
    "dropout_ps too few": (dict(dropout_ps=(0.1,)), r"dropout_ps must have one item per adapter"),
    "A numpy": (dict(lora_As=[np.ones((2, 6), np.float32), torch.ones(3, 6)]),
                r"lora_As\[0\] must be a torch.Tensor, got numpy.ndarray"),
    "A float64": (dict(lora_As=[torch.ones(2, 6), torch.ones(3, 6, dtype=torch.float64)]),
                  r"lora_As\[1\] must be float32, got torch.float64"),
    "A in mismatch": (dict(lora_As=[torch.ones(2, 6), torch.ones(3, 5)]),
                      r"lora_As\[1\] must be \(rank, 6\) with rank >= 1 to match x \(5, 6\), got \(3, 5\)"),
    "A rank 0": (dict(lora_As=[torch.ones(0, 6), torch.ones(3, 6)], lora_Bs=[torch.ones(7, 0), torch.ones(7, 3)]),
                 r"lora_As\[0\] must be \(rank, 6\) with rank >= 1"),
    "B rank mismatch": (dict(lora_Bs=[torch.ones(7, 2), torch.ones(7, 2)]),
                        r"lora_Bs\[1\] must be \(7, 3\) to match weight \(7, 6\) and lora_As\[1\] \(3, 6\), "
                        r"got \(7, 2\)"),
    "B out mismatch": (dict(lora_Bs=[torch.ones(8, 2), torch.ones(7, 3)]), r"lora_Bs\[0\] must be \(7, 2\)"),
    "B no unit stride": (dict(lora_Bs=[torch.ones(14, 4)[::2, ::2], torch.ones(7, 3)]),
                         r"lora_Bs\[0\] must be row- or column-major"),
    "B on meta": (dict(lora_Bs=[torch.ones(7, 2), torch.ones(7, 3, device="meta")]),
                  r"lora_Bs\[1\] must be on the CPU"),
    "scale not a number": (dict(scales=[1.0, "2"]), r"scales\[1\] must be a number, got str"),
    "scale inf": (dict(scales=[float("inf"), 1.0]), r"scales\[0\] must be finite"),
    "dropout 1": (dict(dropout_ps=[0.1, 1.0]), r"dropout_ps\[1\] must be in \[0, 1\), got 1"),
    "negative dropout": (dict(dropout_ps=[-0.1, 0.0]), r"dropout_ps\[0\] must be in \[0, 1\)"),
    "id too large": (dict(adapter_ids=torch.tensor([0, -1, 2, 1, 0])),
                     r"adapter_ids\[2\] = 2 is out of range \[-1, 2\) for 2 adapters \(-1: no adapter\)"),
    "id below -1": (dict(adapter_ids=torch.tensor([0, -1, 1, 1, -2])), r"adapter_ids\[4\] = -2 is out of range"),
    "ids int32": (dict(adapter_ids=torch.tensor([0, -1, 1, 1, 0], dtype=torch.int32)),
                  "adapter_ids must be int64, got torch.int32"),
    "ids length": (dict(adapter_ids=torch.tensor([0, 1, 1])), r"adapter_ids must have shape \(5,\), one per row of x, "
                                                              r"got \(3,\)"),
    "ids 2-D": (dict(adapter_ids=torch.zeros(5, 1, dtype=torch.int64)), "adapter_ids must have 1 dims"),
    "ids list": (dict(adapter_ids=[0, -1, 1, 1, 0]), "adapter_ids must be a torch.Tensor, got list"),
    "x float64": (dict(x=torch.ones(5, 6, dtype=torch.float64)), "x must be float32, got torch.float64"),
    "weight in mismatch": (dict(weight=torch.ones(7, 5)),
                           r"weight must be \(out, 6\) to match x \(5, 6\), got \(7, 5\)"),
    "bias shape": (dict(bias=torch.ones(3)), r"bias must have shape \(7,\), got \(3,\)"),
    "zero threads": (dict(threads=0), "threads must be >= 1"),
}


MALFORMED_CALLS = [("forward", _good_args, name, *BAD_FORWARD_ARGS[name]) for name in BAD_FORWARD_ARGS] + \
    [("forward_mixed", _good_mixed_args, name, *BAD_MIXED_ARGS[name]) for name in BAD_MIXED_ARGS]


@pytest.mark.parametrize(("function", "good_args", "name", "changes", "message"), MALFORMED_CALLS,
                         ids=[f"{c[0]}-{c[2]}" for c in MALFORMED_CALLS])
def test_malformed_direct_calls_raise_naming_the_argument(function, good_args, name, changes, message):
    call = getattr(cpu._C, function)
    args = good_args()
    call(**args)  # the good call works
    with pytest.raises((ValueError, TypeError), match=message):
        call(**args | changes)


def test_malformed_mixed_backward_calls_raise():
    a = _good_mixed_args()
    del a["bias"]
    good = dict(a, need_dx=True, grad_out=torch.ones(5, 7), need_lora=[True, False])
    dx, dAs, dBs = cpu._C.backward_mixed(**good)
    assert dx.shape == (5, 6) and [t is None for t in dAs + dBs] == [False, True, False, True]
    bad_args = [(dict(grad_out=torch.ones(5, 6)), r"grad_out must be \(5, 7\), got \(5, 6\)"),
                (dict(need_lora=[True]), r"need_lora must have one item per adapter \(2, as lora_As\), got 1"),
                (dict(need_lora=True), "need_lora must be a list or tuple, got bool"),
                (dict(adapter_ids=torch.tensor([0, 5, 1, 1, 0])), r"adapter_ids\[1\] = 5 is out of range")]
    for bad, message in bad_args:
        with pytest.raises((ValueError, TypeError), match=message):
            cpu._C.backward_mixed(**(good | bad))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_repeated_mixed_calls_do_not_grow_memory(one_thread):
    x, weight, bias, As, Bs = make_mixed(64, 48, 80, [4, 2, 8])
    ids, seed, grad = torch.arange(64) % 4 - 1, torch.tensor(1), torch.randn(64, 80)

    def calls(n):
        for _ in range(n):
            rows = routed(ids, 3, x)
            cpu.forward_mixed(x, weight, bias, As, Bs, [1.0] * 3, [0.1] * 3, rows, seed)
            cpu.backward_mixed(grad, x, weight, As, Bs, [1.0] * 3, [0.1] * 3, rows, seed, True, [True] * 3)

    calls(500)
    before = _rss_bytes()
    calls(5000)
    assert _rss_bytes() - before < 8 * 2**20


@pytest.mark.parametrize("gemm", ["torch", "openblas"])
@pytest.mark.parametrize("m", [16, 64])
def test_a_layer_whose_w_and_ba_nearly_cancel_is_no_less_accurate_than_peft(gemm, m, monkeypatch):
    """W = -scale B A + noise with entries ~2e7 (LoRA-GA-style inits): every fp32 composition loses most digits
    here, so the measure is the error against float64, over 16 problems; the extension's must be no larger than
    peft's composition's ``(x W^T + b) + (x A^T) B^T * scale`` (5% for the median's noise)."""
    monkeypatch.setattr(cpu, "_gemm", gemm)
    errors, peft_errors = [], []
    for seed in range(16):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(m, 64, generator=gen)
        A, B = torch.randn(8, 64, generator=gen) * 1000, torch.randn(48, 8, generator=gen) * 1000
        W = (-(2.0 * B.double() @ A.double()) + torch.randn(48, 64, generator=gen).double()).float()
        b = torch.randn(48, generator=gen)
        exact = x.double() @ W.double().t() + b.double() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
        errors.append(rel_err(cpu.forward(x, W, b, A, B, 2.0, 0.0, torch.tensor(0))[0], exact))
        peft_errors.append(rel_err((x @ W.t() + b) + ((x @ A.t()) @ B.t()) * 2.0, exact))
    assert np.median(errors) <= 1.05 * np.median(peft_errors)


# ---------------------------------------------------------------- DoRA


def make_dora(m, n_in, n_out, rank, conv1d=False, seed=0, groups=None):
    """make()'s tensors and a magnitude moved off the norms; with groups (slices), B and m of the enabled ones."""
    x, weight, bias, lora_A, lora_B = make(m, n_in, n_out, rank, conv1d, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if groups:
        enabled = sum(groups)
        lora_A = torch.randn(rank * enabled, n_in, generator=gen) * n_in**-0.5
        lora_B = torch.randn(n_out // len(groups) * enabled, rank, generator=gen) * rank**-0.5
    magnitude = torch.rand(lora_B.shape[0], generator=gen) + 0.5
    return x, weight, bias, lora_A, lora_B, magnitude


def check_dora(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, slices=None,
               needs=(True, True, True, True), saved=True, tol=TOLERANCE[torch.float32]):
    """The backend's DoRA forward and backward (with the forward's saved tensors, or recomputing them) against
    the float64 composition; the gradients that needs leaves out are None."""
    seed_t = torch.tensor(seed)
    y, kept = cpu.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed_t, slices, needs)
    grad = torch.randn_like(y)
    got = cpu.dora_backward(grad, x, weight, lora_A, lora_B, magnitude, scale, p, seed_t, needs, slices,
                            kept if saved else ())
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B, magnitude)]
    want = float64_dora(leaves[0], weight, bias, *leaves[1:], scale, p, seed, slices)
    want.backward(grad.double())
    assert y.dtype == torch.float32 and rel_err(y, want) <= tol, f"y error {rel_err(y, want):.2e}"
    for name, g, leaf, needed in zip(("dx", "dA", "dB", "dm"), got, leaves, needs, strict=True):
        if not needed:
            assert g is None, name
            continue
        assert g.dtype == torch.float32 and g.shape == leaf.shape, name
        assert rel_err(g, leaf.grad) <= tol, f"{name} error {rel_err(g, leaf.grad):.2e}"
    return y


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 5, 9, 64, 600], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_dora_every_kernel_path_matches_float64(isa, gemm, threads, m, conv1d, p):
    """Streaming rows (M <= 8), column-split and row-split tiles, both layouts and GEMMs, every ISA, dropout on/off;
    sizes off the vector width."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_dora(*make_dora(m, 97, 523, 5, conv1d=conv1d, seed=m), scale=1.5, p=p, seed=m + 7)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rank", [1, 3, 12, 16, 17])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dora_ranks_around_the_norms_panels(isa, two_threads, rank, conv1d):
    """The norms' W A^T: the streaming kernel below rank 12, panels of 16 (padded) from 12 up, packed W^T blocks
    for a column-major W (out not a multiple of 16 or of their 48 rows)."""
    check_dora(*make_dora(70, 131, 203, rank, conv1d=conv1d, seed=rank), scale=0.7, p=0.25, seed=3)


@pytest.mark.parametrize("m", [1, 130])
def test_dora_row_strided_x(two_threads, gemm, m):
    x, weight, bias, lora_A, lora_B, magnitude = make_dora(m, 40, 72, 4, seed=m)
    wide = torch.randn(m, 100)
    wide[:, :40] = x
    check_dora(wide[:, :40], weight, bias, lora_A, lora_B, magnitude, scale=1.0, p=0.1, seed=m)


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, False, False, True),
                                   (False, True, True, False), (True, False, False, True),
                                   (False, True, False, True)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("saved", [True, False], ids=["saved", "recomputed"])
def test_dora_gradients_by_need(two_threads, needs, p, saved):
    """Each subset of (dx, dA, dB, dm), from the forward's saved tensors or recomputing them (the compiled path)."""
    check_dora(*make_dora(150, 33, 65, 4, seed=2), scale=2.0, p=p, seed=5, needs=needs, saved=saved)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_slices_leave_a_disabled_group_exactly_the_base_product(gemm, one_thread, p):
    """With slices, the disabled group's output is the base product plus bias, bit for bit (the product the
    extension computes with this GEMM: its bias-free LoRA forward with a zero B), and every gradient matches."""
    groups = (True, False, True)
    x, weight, bias, lora_A, lora_B, magnitude = make_dora(40, 300, 48, 3, seed=6, groups=groups)
    y = check_dora(x, weight, bias, lora_A, lora_B, magnitude, 1.5, p, 4, slices=groups)
    base = cpu.forward(x, weight, None, lora_A, torch.zeros(48, 6), 1.0, 0.0, torch.tensor(0))[0] + bias
    assert torch.equal(y[:, 16:32], base[:, 16:32])


def test_dora_a_zero_magnitude_keeps_dm_exact(two_threads):
    """m_i = 0 makes y_i the bias whatever u_i is: the forward then keeps u itself for dm."""
    x, weight, bias, lora_A, lora_B, magnitude = make_dora(90, 24, 30, 4, seed=8)
    magnitude[[0, 7]] = 0.0
    _, (_, output, _, dropped) = cpu.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, 1.0, 0.0,
                                                  torch.tensor(0), None, (True, True, True, True))
    assert output is None and dropped is not None
    check_dora(x, weight, bias, lora_A, lora_B, magnitude, 1.0, 0.0, 0)


def test_dora_saves_the_output_itself_without_dropout():
    """dm reduces against y (u = (y - b) / c): no (M, out) tensor saved beyond the output the caller holds."""
    x, weight, bias, lora_A, lora_B, magnitude = make_dora(20, 16, 24, 4)
    y, (norm, output, saved_bias, dropped) = cpu.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, 1.0, 0.0,
                                                              torch.tensor(0), None, (True, True, True, True))
    assert output is y and saved_bias is bias and dropped is None and norm.shape == (24,)
    assert cpu.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, 1.0, 0.0, torch.tensor(0), None,
                            (True, True, True, False))[1][1:] == (None, None, None)


def test_modifying_the_dora_output_in_place_is_an_autograd_error():
    """The output is saved for dm, so an in-place change to it before backward raises instead of corrupting dm."""
    x, weight, bias, lora_A, lora_B, magnitude = make_dora(6, 8, 10, 2)
    y = fastlora.lora_linear(x, weight, bias, lora_A.requires_grad_(), lora_B, 1.0,
                             magnitude=magnitude.requires_grad_())
    y.relu_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_dora_nan_propagates_as_in_the_reference(two_threads, gemm):
    x, weight, bias, lora_A, lora_B, magnitude = make_dora(140, 40, 24, 4)
    x[3, 5], x[77, 0] = float("nan"), float("nan")
    grad = torch.randn(140, 24)
    grad[10, 2] = float("nan")
    needs = (True, True, True, True)
    for p in (0.0, 0.5):
        seed = torch.tensor(9)
        y, saved = cpu.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, 1.0, p, seed, None, needs)
        got = (y, *cpu.dora_backward(grad, x, weight, lora_A, lora_B, magnitude, 1.0, p, seed, needs, None, saved))
        y_ref, saved_ref = reference.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, 1.0, p, seed, None, needs)
        want = (y_ref, *reference.dora_backward(grad, x, weight, lora_A, lora_B, magnitude, 1.0, p, seed, needs, None,
                                                saved_ref))
        for name, g, w in zip(("y", "dx", "dA", "dB", "dm"), got, want, strict=True):
            assert torch.equal(g.isnan(), w.isnan()), (p, name)


def _good_dora_args():
    m, n_in, n_out, rank = 5, 6, 8, 2
    return dict(x=torch.ones(m, n_in), weight=torch.ones(n_out, n_in), bias=torch.ones(n_out),
                lora_A=torch.ones(rank, n_in), lora_B=torch.ones(n_out, rank), magnitude=torch.ones(n_out),
                slices=None, scale=1.0, dropout_p=0.1, seed=3, threads=2, torch_gemm=False, want_dropped=True)


BAD_DORA_ARGS = {
    "magnitude shape": (dict(magnitude=torch.ones(7)), r"magnitude must have shape \(8,\), got \(7,\)"),
    "magnitude float64": (dict(magnitude=torch.ones(8, dtype=torch.float64)), "magnitude must be float32"),
    "magnitude of slices": (dict(slices=[True, False]), r"magnitude must have shape \(4,\), got \(8,\)"),
    "slices not dividing": (dict(slices=[True, False, True]), "3 groups do not divide the 8 output features"),
    "no slice enabled": (dict(slices=[False, False]), "slices must enable at least one group"),
    "slices not a list": (dict(slices=True), "slices must be a list or tuple, got bool"),
    "lora_B shape": (dict(lora_B=torch.ones(8, 3)), r"lora_B must have shape \(8, 2\)"),
    "x float64": (dict(x=torch.ones(5, 6, dtype=torch.float64)), "x must be float32, got torch.float64"),
}


@pytest.mark.parametrize("name", BAD_DORA_ARGS)
def test_malformed_dora_calls_raise_naming_the_argument(name):
    changes, message = BAD_DORA_ARGS[name]
    cpu._C.dora_forward(**_good_dora_args())
    with pytest.raises((ValueError, TypeError), match=message):
        cpu._C.dora_forward(**_good_dora_args() | changes)


def test_malformed_dora_backward_calls_raise():
    a = _good_dora_args()
    y, norm, dropped = cpu._C.dora_forward(**a)
    for key in ("want_dropped", "bias"):
        del a[key]
    good = dict(a, grad_out=torch.ones(5, 8), norm=norm, output=None, bias=None, dropped=dropped, need_dx=True,
                need_dA=False, need_dB=True, need_dm=True)
    dx, dA, dB, dm = cpu._C.dora_backward(**good)
    assert dx.shape == (5, 6) and dA is None and dB.shape == (8, 2) and dm.shape == (8,)
    bad_args = [(dict(grad_out=torch.ones(5, 6)), r"grad_out must be \(5, 8\), got \(5, 6\)"),
                (dict(norm=torch.ones(7)), r"norm must have shape \(8,\), got \(7,\)"),
                (dict(dropped=torch.ones(4, 8)), r"dropped must have shape \(5, 8\), got \(4, 8\)"),
                (dict(dropped=None), "dm needs the forward's output or dropped"),
                (dict(dropped=None, output=y), "dm with dropout needs the forward's dropped")]
    for bad, message in bad_args:
        with pytest.raises((ValueError, TypeError), match=message):
            cpu._C.dora_backward(**(good | bad))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_repeated_dora_calls_do_not_grow_memory(one_thread):
    x, weight, bias, lora_A, lora_B, magnitude = make_dora(64, 48, 80, 4)
    seed, grad, needs = torch.tensor(1), torch.randn(64, 80), (True, True, True, True)

    def calls(n):
        for p in [0.0, 0.1] * (n // 2):
            _, saved = cpu.dora_forward(x, weight, bias, lora_A, lora_B, magnitude, 1.0, p, seed, None, needs)
            cpu.dora_backward(grad, x, weight, lora_A, lora_B, magnitude, 1.0, p, seed, needs, None, saved)

    calls(500)
    before = _rss_bytes()
    calls(3000)
    assert _rss_bytes() - before < 8 * 2**20
