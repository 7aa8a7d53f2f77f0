"""Triton-backend specifics: dropout masks bit for bit, partial gradients, dB splits, strided operands, GPU rules."""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TOLERANCE, rel_err

from fastlora.ops import reference
from fastlora.ops.reference import dropout_keep_mask

triton_backend = pytest.importorskip("fastlora.ops.triton", reason="triton is unavailable", exc_type=ImportError)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = [0, 12345, (7 << 32) + 99, 2**62 - 1, -3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_forward_kernel_mask_is_bit_identical_to_reference(seed, p):
    """With A = I and x = 1 the forward's low-rank input is exactly the keep-mask over 1-p."""
    rows, cols = 70, 80  # neither a multiple of any block size
    x = torch.ones(rows, cols, device=DEVICE)
    drop = triton_backend._dropout_args(p, torch.tensor(seed))
    h = triton_backend._lora_down(x, torch.eye(cols, device=DEVICE), drop)
    keep = dropout_keep_mask(torch.tensor(seed), rows, cols, p, torch.device(DEVICE))
    assert torch.equal(h[:, :cols] != 0, keep)
    assert torch.all(h[:, :cols][keep] == torch.tensor(1 / (1 - p), dtype=torch.float32))


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_dx_kernel_mask_is_bit_identical_to_reference(seed):
    """With W = 0 the dx GEMM's output is its masked rank-R term alone: its support is the mask."""
    rows, n_in, n_out, p = 45, 72, 24, 0.3
    dy, lora_A, lora_B = (torch.ones(*shape, device=DEVICE) for shape in ((rows, n_out), (3, n_in), (n_out, 3)))
    x, weight = torch.randn(rows, n_in, device=DEVICE), torch.zeros(n_out, n_in, device=DEVICE)
    dx, _, _ = triton_backend.backward(dy, x, weight, lora_A, lora_B, 1.0, p, torch.tensor(seed), (True, False, False))
    keep = dropout_keep_mask(torch.tensor(seed), rows, n_in, p, torch.device(DEVICE))
    assert torch.equal(dx != 0, keep)
    assert torch.allclose(dx[keep], torch.full_like(dx[keep], 3 * n_out / (1 - p)), rtol=1e-6, atol=0)


def _operands(rows, n_in, n_out, rank, dtype):
    """Strided x (every other column), a Conv1D-style transposed weight view, and a rank-`rank` adapter."""
    gen = torch.Generator().manual_seed(rows * 1000 + rank)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)

    x = rand(rows, 2 * n_in)[:, ::2]
    weight = rand(n_in, n_out, scale=n_in**-0.5).t()
    return x, weight, rand(n_out), rand(rank, n_in, scale=n_in**-0.5), rand(n_out, rank, scale=rank**-0.5)


NEEDS = [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_computes_only_what_is_needed(needs, dtype):
    x, weight, _, lora_A, lora_B = _operands(45, 40, 56, 5, dtype)
    assert not x.is_contiguous() and not weight.is_contiguous()
    grad_out = torch.randn(45, 56, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    args = (grad_out, x, weight, lora_A, lora_B, 1.5, 0.2, torch.tensor(77), needs)
    got = triton_backend.backward(*args)
    expected = reference.backward(grad_out.double(), x.double(), weight.double(), lora_A.double(), lora_B.double(),
                                  *args[5:])
    for name, need, g, e in zip(("dx", "dA", "dB"), needs, got, expected, strict=True):
        assert (g is None) == (not need), name
        if need:
            assert g.dtype == dtype and g.shape == e.shape, name
            assert rel_err(g, e) <= TOLERANCE[dtype], f"{name} error {rel_err(g, e):.2e}"


@pytest.mark.parametrize("n_in, n_out", [(6, 0), (0, 7)])
def test_layer_without_inputs_or_outputs(n_in, n_out):
    x, weight, bias, lora_A, lora_B = (torch.randn(*shape, device=DEVICE)
                                       for shape in ((5, n_in), (n_out, n_in), (n_out,), (2, n_in), (n_out, 2)))
    out = triton_backend.forward(x, weight, bias, lora_A, lora_B, 1.0, 0.0, torch.tensor(0))
    assert torch.equal(out, bias.expand(5, n_out))
    grads = triton_backend.backward(torch.ones(5, n_out, device=DEVICE), x, weight, lora_A, lora_B, 1.0, 0.0,
                                    torch.tensor(0), (True, True, True))
    assert [tuple(g.shape) for g in grads] == [(5, n_in), (2, n_in), (n_out, 2)]
    assert all(not g.abs().sum() for g in grads)


@pytest.mark.parametrize("rows", [5, 200])  # one row split (a plain store) and several (atomic adds)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_db_alone_with_strided_grad_over_row_splits(rows, dtype):
    """dB with no dx or dA launch, from a transposed grad_out view, over 1 or several splits of the rows."""
    x, weight, _, lora_A, lora_B = _operands(rows, 24, 40, 3, dtype)
    grad_out = torch.randn(40, rows, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype).t()
    args = (grad_out, x, weight, lora_A, lora_B, 0.8, 0.3, torch.tensor(9), (False, False, True))
    _, _, got = triton_backend.backward(*args)
    expected = reference.backward(grad_out.double(), x.double(), weight.double(), lora_A.double(), lora_B.double(),
                                  *args[5:])[2]
    assert got.dtype == dtype and rel_err(got, expected) <= TOLERANCE[dtype], f"dB error {rel_err(got, expected):.2e}"


@pytest.mark.parametrize("rows", [1, 31, 32, 33, 1000, 4097])
@pytest.mark.parametrize("column_blocks", [1, 3, 100])
@pytest.mark.parametrize("side", [16, 64])
def test_db_row_splits_cover_all_rows_in_whole_blocks(rows, column_blocks, side):
    for programs in (4, 264):
        rows_per_split, splits = triton_backend._db_splits(rows, column_blocks, side, programs)
        assert rows_per_split % side == 0
        assert (splits - 1) * rows_per_split < rows <= splits * rows_per_split
        assert splits <= max(1, programs // column_blocks)


def test_db_tiles_fit_shared_memory_up_to_rank_512():
    for r_pad in (16, 32, 64, 128, 256, 512):
        side, stages = triton_backend._db_tile(r_pad)
        assert 16 <= side <= 64 and stages * (side * side + side * r_pad) * 4 <= 72 * 1024


@pytest.mark.parametrize("rows", [1, 33, 130])
def test_forward_with_strided_operands_and_large_rank(rows):
    """Non-contiguous x and weight, M off every block size, rank above the 16-wide padding."""
    x, weight, bias, lora_A, lora_B = _operands(rows, 48, 40, 20, torch.float32)
    seed = torch.tensor(5)
    got = triton_backend.forward(x, weight, bias, lora_A, lora_B, 0.7, 0.1, seed)
    expected = reference.forward(x.double(), weight.double(), bias.double(), lora_A.double(), lora_B.double(),
                                 0.7, 0.1, seed)
    assert rel_err(got, expected) <= TOLERANCE[torch.float32]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gate only refuses machines without CUDA")
def test_import_without_cuda_or_interpreter_says_why():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import fastlora.ops.triton"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError: the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1" in result.stderr


_HOPPER_COMPILE = r'''
import importlib.util, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("kernels", sys.argv[1])
kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels)
tiles = json.loads(sys.argv[2])
UNSPECIALIZED = {"M", "R", "seed_lo", "seed_hi", "threshold", "scale", "inv_keep", "stride_bn", "stride_ar",
                 "rows_per_split"}
REDUCTION = re.compile(r"\bred\.global\.")  # not the "shared.global" of cp.async

def ptx(fn, constexprs, unit_strides, tile, dtype="bf16"):
    """Compile for sm_90 as the JIT would for aligned tensors with 16-divisible sizes."""
    signature, attrs = {}, {}
    fp32_ptrs = {"h_ptr", "da_ptr"} | ({"db_ptr"} if constexprs.get("ATOMIC") else set())
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in unit_strides:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_ptrs else "*" + dtype
        else:
            signature[name] = "fp32" if name in ("scale", "inv_keep") else "i32"
        if signature[name] != "constexpr" and name not in UNSPECIALIZED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs={**constexprs, **{s: 1 for s in unit_strides}}, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": tile[-1], "num_stages": tile[-2]})
    check_slot_reuse(compiled.asm["ttgir"])
    return compiled.asm["ptx"], compiled.metadata.shared

def check_slot_reuse(ttgir):
    """Each pipelined loop reads its shared-memory slots (local_load) before it refills them
    (async copies), outside any branch: the old dB read a refilled slot inside an scf.if."""
    for body in ttgir.split("scf.for ")[1:]:
        body = body[:body.index("scf.yield")]
        assert "scf.if" not in body, "a branch inside a pipelined loop"
        read, refill = body.rfind("ttg.local_load"), body.find("ttg.async_copy_global_to_local")
        assert read < 0 or refill < 0 or read < refill, "a slot read after its refill"

def backward(tile, precision, dtype):
    bm, bk, bn = tile[:3]
    return ptx(kernels._lora_backward_kernel,
               {"R_PAD": 16, "PRECISION": precision, "BLOCK_M": bm, "GROUP_M": 8, "NEED_DX": True, "NEED_DA": True,
                "DROPOUT": True, "BLOCK_N": bn, "BLOCK_K": bk},
               ["stride_dyn", "stride_wn", "stride_ak", "stride_br", "stride_xk", "stride_dxk"], tile, dtype)

def db(atomic, precision, dtype):
    side, stages = tiles["db"]
    return ptx(kernels._lora_db_kernel, {"ATOMIC": atomic, "R_PAD": 16, "PRECISION": precision, "BLOCK_N": side,
                                         "BLOCK_M": side}, ["stride_dyn"], (stages, 4), dtype)

bm, bn, bk = tiles["16bit"][:3]
fwd, fwd_shared = ptx(kernels._lora_forward_kernel, {"R_PAD": 16, "PRECISION": "tf32", "BLOCK_M": bm, "GROUP_M": 8,
                                                     "HAS_BIAS": True, "BLOCK_N": bn, "BLOCK_K": bk},
                      ["stride_xk", "stride_wn", "stride_br", "stride_on"], tiles["16bit"])
bwd, bwd_shared = backward(tiles["16bit"], "tf32", "bf16")
ptx(kernels._lora_down_kernel, {"DROPOUT": True, "R_PAD": 16, "PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_K": 64},
    ["stride_xk", "stride_ak"], (2, 4))
db_add, db_shared = db(True, "tf32", "bf16")
db_store, _ = db(False, "tf32", "bf16")
for name, code in (("forward", fwd), ("backward", bwd), ("dB add", db_add), ("dB store", db_store)):
    assert "wgmma.mma_async" in code, name + ": no wgmma"
    assert "cp.async" in code, name + ": loads are not pipelined"
assert REDUCTION.search(bwd) and REDUCTION.search(db_add), "dA/dB not accumulated with reductions"
assert not REDUCTION.search(db_store) and "st.global" in db_store, "one dB split: not a plain store"
fp32_bwd, _ = backward(tiles["fp32"], "ieee", "fp32")  # the precision of the GPU run that found dB wrong
fp32_db, _ = db(True, "ieee", "fp32")
assert REDUCTION.search(fp32_bwd) and REDUCTION.search(fp32_db), "fp32: dA/dB not accumulated with reductions"
print("compiled for sm_90; shared bytes", fwd_shared, bwd_shared, db_shared)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile and run in the other tests")
def test_kernels_compile_for_hopper_with_pipelined_wgmma():
    """Compile (no GPU needed) every kernel for sm_90: the widest Hopper tile, fp32 IEEE, both dB write paths."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this triton has no ahead-of-time compile API: {error}")
    kernels_path = os.path.join(os.path.dirname(triton_backend.__file__), "_kernels.py")
    tiles = {"16bit": triton_backend.TILES["16bit"][0], "fp32": triton_backend.TILES["fp32-small-m"][0],
             "db": triton_backend._db_tile(16)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE, kernels_path, json.dumps(tiles)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled for sm_90" in result.stdout
    fwd_shared, bwd_shared, db_shared = map(int, result.stdout.split()[-3:])
    assert fwd_shared <= triton_backend._smem_bytes(tiles["16bit"], 16, 2, backward=False)
    assert bwd_shared <= triton_backend._smem_bytes(tiles["16bit"], 16, 2, backward=True)
    side, stages = tiles["db"]
    assert db_shared <= stages * (side * side + side * 16) * 4


def _calls(node: ast.AST) -> set[str]:
    """The dotted name of every call under a node (``tl.dot``)."""
    return {ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}


def test_kernels_follow_the_rules_the_interpreter_cannot_check():
    """_kernels.py's GPU rules: loops branch only on constexprs and hold no atomics; no tl.trans anywhere."""
    kernels_path = os.path.join(os.path.dirname(triton_backend.__file__), "_kernels.py")
    with open(kernels_path) as source:
        tree = ast.parse(source.read())
    loops = [node for node in ast.walk(tree) if isinstance(node, ast.For)]
    assert len(loops) == 4  # the down, forward, backward and dB kernels' loops
    for loop in loops:
        for node in ast.walk(loop):
            if isinstance(node, ast.If):
                assert isinstance(node.test, ast.Name) and node.test.id.isupper(), ast.unparse(node.test)
        assert not {call for call in _calls(loop) if call.startswith("tl.atomic")}, ast.unparse(loop)[:200]
    assert "tl.trans" not in _calls(tree)


H100_SMEM, SMALL_CARD_SMEM = 232448, 101376


@pytest.mark.parametrize("backward", [False, True])
def test_tiles_that_do_not_fit_shared_memory_are_dropped(backward):
    assert triton_backend._fitting_tiles(backward, "16bit", 16, H100_SMEM) == triton_backend.TILES["16bit"]
    for family in triton_backend.TILES:
        for r_pad in (16, 64, 256):
            elem = 4 if family.startswith("fp32") else 2
            for smem in (H100_SMEM, SMALL_CARD_SMEM):
                tiles = triton_backend._fitting_tiles(backward, family, r_pad, smem)
                assert tiles and all(triton_backend._smem_bytes(t, r_pad, elem, backward) <= smem for t in tiles)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU benchmarks/gpu_check.sh runs the real benchmark")
def test_gpu_benchmark_dry_run_exercises_every_code_path(tmp_path):
    """benchmarks/gpu_bench.py --dry-run: tiny fp32 layer grid and training steps through the triton kernels."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_bench.py")
    result = subprocess.run([sys.executable, script, "--dry-run", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert results["environment"]["backends"]["triton"][0]
    assert {row["mode"] for row in results["layers"]} == {"forward", "forward+backward"}
    assert all(row["fastlora_rel_err_p0"] < 1e-5 for row in results["layers"])
    assert set(results["training"]) == {"peft", "fastlora q,v", "fastlora q,k,v"}
    assert "| fastlora q,v |" in (tmp_path / "gpu_bench.md").read_text()
