"""Triton-backend specifics: dropout masks bit for bit, partial gradients, dB splits, strided operands, GPU rules."""

import ast
import csv
import gc
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import TOLERANCE, rel_err

import fastlora
from fastlora.ops import reference
from fastlora.ops.reference import dropout_keep_mask
from fastlora.ops.routing import AdapterRouting

triton_backend = pytest.importorskip("fastlora.ops.triton", reason="triton is unavailable", exc_type=ImportError)
mixed, single, tuning = triton_backend.mixed, triton_backend.single, triton_backend.tuning
dora = triton_backend.dora
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = [0, 12345, (7 << 32) + 99, 2**62 - 1, -3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_forward_kernel_mask_is_bit_identical_to_reference(seed, p):
    """With A = I and x = 1 the forward's low-rank input is exactly the keep-mask over 1-p."""
    rows, cols = 70, 80  # neither a multiple of any block size
    x = torch.ones(rows, cols, device=DEVICE)
    drop = single.dropout_args(p, torch.tensor(seed))
    layout = single.layout(rows, 3, cols, None, 0)
    h = single.down(x, torch.eye(cols, device=DEVICE), torch.zeros(3, cols, device=DEVICE), layout, drop)
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
# bf16 only on a GPU: the interpreter does not emulate bf16 dots (its results are garbage).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, rows", [(0.2, 45), (0.0, 45), (0.2, tuning.SMALL_M + 45)])
def test_backward_computes_only_what_is_needed(needs, dtype, p, rows):
    """Each of dx, dA, dB alone or all three, for a layer whose sizes are no multiples of 16, with a strided x
    and a Conv1D weight; on a GPU 45 rows take the small-M tile, 1069 the autotuned ones (a ptxas once
    miscompiled such a layer's dx-only kernel: docs/triton-notes.md)."""
    x, weight, _, lora_A, lora_B = _operands(rows, 40, 56, 5, dtype)
    assert not x.is_contiguous() and not weight.is_contiguous()
    grad_out = torch.randn(rows, 56, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    args = (grad_out, x, weight, lora_A, lora_B, 1.5, p, torch.tensor(77), needs)
    got = triton_backend.backward(*args)
    expected = reference.backward(grad_out.double(), x.double(), weight.double(), lora_A.double(), lora_B.double(),
                                  *args[5:])
    for name, need, g, e in zip(("dx", "dA", "dB"), needs, got, expected, strict=True):
        assert (g is None) == (not need), name
        if need:
            assert g.dtype == dtype and g.shape == e.shape, name
            assert rel_err(g, e) <= TOLERANCE[dtype], f"{name} error {rel_err(g, e):.2e}"


@pytest.mark.parametrize("rank, slices", [(5, None), (16, None), (3, (True, False, True)), (4, (False, True))])
def test_forward_prepares_the_backward_b_and_zeroes_its_gradient_buffers(rank, slices):
    """The forward's first launch also lays B out as the backward GEMM reads it (dense, contiguous (N, h_pad),
    zero outside each enabled slice's rank columns, no mask needed along its contiguous axis) and zeroes the
    fp32 buffers dA and dB accumulate into; B already so laid out is used as it is."""
    n_in, n_out, rows = 8, 48, 40
    enabled = sum(slices) if slices else 1
    lora_A = torch.randn(rank * enabled, n_in, device=DEVICE)
    lora_B = torch.randn(rank, n_out // len(slices) * enabled if slices else n_out, device=DEVICE).t()  # strided
    layout = single.layout(rows, n_out, lora_A.shape[0], slices, 0)
    bpad = torch.full((n_out, layout.h_pad), 7.0, device=DEVICE)
    dA, dB = torch.full_like(lora_A, 7.0), torch.full_like(lora_B, 7.0)
    single.down(torch.randn(rows, n_in, device=DEVICE), lora_A, lora_B, layout,
                         single.NO_DROPOUT, bpad, dA, dB)
    dense = reference.expand_slices(lora_B, slices, n_out) if slices else lora_B
    expected = torch.zeros(n_out, layout.h_pad, device=DEVICE)
    for e in range(enabled):  # slice e's rank columns start at e * rs_pad
        expected[:, e * layout.rs_pad:e * layout.rs_pad + rank] = dense[:, e * rank:(e + 1) * rank]
    assert torch.equal(bpad, expected)
    assert not dA.any() and not dB.any()
    assert single.needs_bpad(lora_B, lora_B, layout)
    contiguous = torch.randn(n_out, 16, device=DEVICE)
    assert single.needs_bpad(contiguous, contiguous, layout) == (rank > 16 or slices is not None or
                                                                          layout.h_pad != 16)


@pytest.mark.parametrize("n_in, n_out", [(6, 0), (0, 7)])
def test_layer_without_inputs_or_outputs(n_in, n_out):
    x, weight, bias, lora_A, lora_B = (torch.randn(*shape, device=DEVICE)
                                       for shape in ((5, n_in), (n_out, n_in), (n_out,), (2, n_in), (n_out, 2)))
    out, _ = triton_backend.forward(x, weight, bias, lora_A, lora_B, 1.0, 0.0, torch.tensor(0))
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
        rows_per_split, splits = tuning.db_splits(rows, column_blocks, side, programs)
        assert rows_per_split % side == 0
        assert (splits - 1) * rows_per_split < rows <= splits * rows_per_split
        assert splits <= max(1, programs // column_blocks)


def test_db_tiles_fit_shared_memory_up_to_rank_512():
    for r_pad in (16, 32, 64, 128, 256, 512):
        side, _ = tuning.db_tile(r_pad)
        assert 16 <= side <= 64 and _db_smem_bytes(r_pad) <= 72 * 1024


@pytest.mark.parametrize("rows", [1, 33, 130])
def test_forward_with_strided_operands_and_large_rank(rows):
    """Non-contiguous x and weight, M off every block size, rank above the 16-wide padding."""
    x, weight, bias, lora_A, lora_B = _operands(rows, 48, 40, 20, torch.float32)
    seed = torch.tensor(5)
    got, _ = triton_backend.forward(x, weight, bias, lora_A, lora_B, 0.7, 0.1, seed)
    expected, _ = reference.forward(x.double(), weight.double(), bias.double(), lora_A.double(), lora_B.double(),
                                    0.7, 0.1, seed)
    assert rel_err(got, expected) <= TOLERANCE[torch.float32]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gate only refuses machines without CUDA")
def test_import_without_cuda_or_interpreter_says_why():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import fastlora.ops.triton"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError: the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1" in result.stderr


H100_SMEM, SMALL_CARD_SMEM = 232448, 101376  # bytes of shared memory per program: H100/H200, RTX 30xx/40xx
# Unit strides the JIT turns into constexprs: Conv1D weights (W's out-features contiguous) or nn.Linear's.
# "strided": test_backward_computes_only_what_is_needed's layer, a Conv1D weight and every other column of x.
FORWARD_UNITS = {"conv1d": ["stride_xk", "stride_wn", "stride_br", "stride_on"],
                 "linear": ["stride_xk", "stride_wk", "stride_br", "stride_on"],
                 "strided": ["stride_wn", "stride_br", "stride_on"]}
BACKWARD_UNITS = {"conv1d": ["stride_dyn", "stride_wn", "stride_ak", "stride_xk", "stride_dxk"],
                  "linear": ["stride_dyn", "stride_wk", "stride_ak", "stride_xk", "stride_dxk"],
                  "strided": ["stride_dyn", "stride_wn", "stride_ak", "stride_dxk"]}
# Every variant the launcher can launch the backward kernel in: dx, dA or both, with and without dropout.
BACKWARD_FLAGS = [{"NEED_DX": dx, "NEED_DA": da, "DROPOUT": dropout}
                  for dx, da in ((True, False), (False, True), (True, True)) for dropout in (True, False)]


def _role(backward: bool) -> str:
    return "backward" if backward else "forward"


def _dtype_precision(family: str) -> tuple[str, str]:
    """The pointer dtype and dot precision a tile family compiles with."""
    return ("fp32", "ieee") if family.startswith("fp32") else ("bf16", "tf32")


def _db_smem_bytes(r_pad: int) -> int:
    """The dB kernel's shared memory bound (``db_tile``'s docstring): stages of (dy, h) fp32-sized tiles."""
    side, stages = tuning.db_tile(r_pad)
    return stages * (side * side + side * r_pad) * 4


def _gemm_jobs() -> list[dict]:
    """Every autotune config of both fused GEMMs at padded rank 16 and at the largest padded rank it is kept
    for on an H100; the fallback tile at 256; the other weight layout, fp16, and the variants without bias,
    without dropout and with partial gradients."""
    jobs = []
    for backward in (False, True):
        for family in tuning.TILES:
            dtype, precision = _dtype_precision(family)
            kept = {r_pad: tuning.fitting_tiles(_role(backward), family, r_pad, H100_SMEM)
                    for r_pad in (16, 64, 256, 512)}
            for tile in tuning.TILES[family]:
                largest = max(r_pad for r_pad, tiles in kept.items() if tile in tiles)
                jobs += [_gemm_job(backward, tile, r_pad, dtype, precision) for r_pad in {16, largest}]
            jobs.append(_gemm_job(backward, tuning.FALLBACK_TILE, 256, dtype, precision))
        tile = tuning.TILES["16bit"][0]
        jobs.append(_gemm_job(backward, tile, 16, "fp16", "tf32", layout="linear"))
        variants = ([{"NEED_DX": dx, "NEED_DA": da} for dx, da in ((True, False), (False, True))]
                    + [{"DROPOUT": False}]) if backward else [{"HAS_BIAS": False}]
        jobs += [_gemm_job(backward, tile, 16, "bf16", "tf32", **variant) for variant in variants]
        # q,v slices at rank 4 (two enabled of three groups, 16 rank columns each) with fp32 LoRA parameters;
        # the backward also with the seed read from memory (a CUDA graph's device-drawn seed)
        slices = {"ENABLED": 2, "SEED_FROM_PTR": True} if backward else {"GROUPS": 3, "SLICE_MASK": 5}
        jobs.append({**_gemm_job(backward, tile, 32, "bf16", "tf32", ptr32=["a_ptr" if backward else "b_ptr"],
                                 **slices), "odd": False})  # shared memory as for padded rank 32, the rank axis
        jobs[-1]["constexprs"].update(RS_PAD=16)
        jobs[-1]["constexprs"].pop("seed_ptr", None)
        for family in ("16bit", "16bit-small-m", "fp32"):  # what a 100 KB card (RTX 30xx/40xx, sm_86) keeps
            dtype, precision = _dtype_precision(family)
            jobs += [_gemm_job(backward, tile, 16, dtype, precision, arch=86, smem=SMALL_CARD_SMEM)
                     for tile in tuning.fitting_tiles(_role(backward), family, 16, SMALL_CARD_SMEM)]
    return list({json.dumps(job, sort_keys=True): job for job in jobs}.values())  # once each


def _variant_jobs() -> list[dict]:
    """The backward kernel in every variant the launcher launches, at the 16-bit small-M tile, for a layer whose
    sizes and strides are multiples of 16 and for one whose are not (``odd``: no divisibility hints, so dy's
    and W's tiles reach shared memory through registers: the layer of test_backward_computes_only_what_is_needed,
    whose dx-only variant a ptxas miscompiled); odd layers also at the widest 16-bit and the small fp32
    tile, in bf16, and through the forward, down and dB kernels."""
    small, widest = tuning.TILES["16bit-small-m"][0], tuning.TILES["16bit"][0]
    jobs = [_gemm_job(True, small, 16, "fp16", "tf32", layout=layout, odd=layout == "strided", **flags)
            for flags in BACKWARD_FLAGS for layout in ("conv1d", "strided")]
    jobs += [_gemm_job(True, tile, 16, dtype, precision, layout="strided", odd=True, **flags)
             for tile, dtype, precision in ((widest, "fp16", "tf32"), (small, "bf16", "tf32"),
                                            (tuning.TILES["fp32-small-m"][0], "fp32", "ieee"))
             for flags in BACKWARD_FLAGS if flags["NEED_DX"] and flags["DROPOUT"]]
    jobs.append(_gemm_job(False, small, 16, "fp16", "tf32", layout="strided", odd=True))
    return jobs + [{**job, "odd": True} for job in _thin_jobs()
                   if job["dtype"] == "bf16" and job["constexprs"].get("RS_PAD") == 16]


def _gemm_job(backward, tile, r_pad, dtype, precision, layout="conv1d", arch=90, smem=H100_SMEM, odd=False,
              ptr32=(), **flags) -> dict:
    rows, cols, step, stages, warps = tile
    if backward:
        constexprs = {"NEED_DX": True, "NEED_DA": True, "DROPOUT": True, "BLOCK_M": rows, "BLOCK_K": cols,
                      "BLOCK_N": step}
    else:
        constexprs = {"HAS_BIAS": True, "BLOCK_M": rows, "BLOCK_N": cols, "BLOCK_K": step}
    rank_axis = {"ENABLED": 1} if backward else {"GROUPS": 1, "SLICE_MASK": 1, "DROPOUT": False}
    constexprs.update(RS_PAD=r_pad, H_PAD=r_pad, PRECISION=precision, GROUP_M=8, SEED_FROM_PTR=False, DORA=False,
                      **rank_axis)
    constexprs.update(flags)
    # As the launcher passes them: the fp32 h, or dA; without dA its pointer is dx's, without dx dx's is dA's.
    fp32_ptrs = ["h_ptr"] if not backward else (["da_ptr"] if constexprs["NEED_DA"] else []) + (
        [] if constexprs["NEED_DX"] else ["dx_ptr"])
    if constexprs.get("SEED_FROM_PTR") is False:
        constexprs["seed_ptr"] = None
    if constexprs["DORA"]:  # DoRA's fp32 factors; the forward also writes u, in x's dtype
        fp32_ptrs.append("c_ptr")
    else:
        constexprs.update({"c_ptr": None} if backward else {"c_ptr": None, "u_ptr": None})
    return {"kernel": "_lora_backward_kernel" if backward else "_lora_forward_kernel", "constexprs": constexprs,
            "unit_strides": (BACKWARD_UNITS if backward else FORWARD_UNITS)[layout], "dtype": dtype,
            "fp32_ptrs": fp32_ptrs + list(ptr32), "ptr_dtypes": {"seed_ptr": "i64"}, "odd": odd,
            "num_warps": warps, "num_stages": stages, "arch": arch,
            "smem_limit": min(smem, tuning.smem_bytes(_role(backward), tile, r_pad, 4 if dtype == "fp32" else 2))}


DB_WITHOUT_DORA = {"NEED_DB": True, "NEED_DM": False, "c_ptr": None, "norm_ptr": None, "u_ptr": None, "dm_ptr": None}


def _dora_jobs() -> list[dict]:
    """DoRA's variants: the forward GEMM with dropout (two accumulators) at every 16-bit tile its role keeps on an
    H100, small-M and fp32, without dropout at every 16-bit tile of its role; the dx kernel likewise (without
    dropout at LoRA's widest tile), also for dA alone; the dB kernel with dm, stored and atomic, and dm alone; the
    norm kernel for nn.Linear and Conv1D weights, fp32 parameters over bf16, and q,v slices."""
    jobs = []
    for backward, role in ((False, "dropped forward"), (True, "dropped backward")):
        for family in ("16bit", "16bit-small-m", "fp32"):
            dtype, precision = _dtype_precision(family)
            jobs += [_gemm_job(backward, tile, 16, dtype, precision, DORA=True, DROPOUT=True)
                     for tile in tuning.fitting_tiles(role, family, 16, H100_SMEM)]
        tiles = tuning.fitting_tiles("dora forward", "16bit", 16, H100_SMEM) if not backward \
            else tuning.TILES["16bit"][:1]
        jobs += [_gemm_job(backward, tile, 16, "bf16", "tf32", DORA=True, DROPOUT=False) for tile in tiles]
    jobs.append(_gemm_job(True, tuning.TILES["16bit-small-m"][0], 16, "bf16", "tf32", DORA=True, NEED_DX=False))
    side, stages = tuning.db_tile(16)
    for atomic, need_db in ((True, True), (False, True), (True, False)):
        jobs.append({"kernel": "_lora_db_kernel", "dtype": "bf16",
                     "fp32_ptrs": ["h_ptr", "c_ptr", "norm_ptr"] + (["db_ptr", "dm_ptr"] if atomic else []),
                     "constexprs": {"ATOMIC": atomic, "RS_PAD": 16, "H_PAD": 16, "GROUPS": 1, "SLICE_MASK": 1,
                                    "PRECISION": "tf32", "BLOCK_N": side, "BLOCK_M": side, "NEED_DB": need_db,
                                    "NEED_DM": True, **({} if need_db else {"db_ptr": None})},
                     "unit_strides": ["stride_dyn"], "num_warps": 4, "num_stages": stages, "arch": 90,
                     "smem_limit": _db_smem_bytes(16) + stages * side * side * 2})
    for unit, lora, slices in (("stride_wk", "bf16", (1, 1, 1)), ("stride_wn", "fp32", (1, 1, 1)),
                               ("stride_wk", "fp32", (3, 5, 2))):
        groups, mask, enabled = slices
        jobs.append({"kernel": "_dora_norm_kernel", "dtype": "bf16",
                     "fp32_ptrs": ["norm_ptr", "c_ptr", "dm_ptr"] + (["a_ptr", "b_ptr", "m_ptr"] if lora == "fp32"
                                                                     else []),
                     "constexprs": {"RS_PAD": 16, "H_PAD": 16 * enabled, "GROUPS": groups, "SLICE_MASK": mask,
                                    "ENABLED": enabled, "BLOCK_N": dora.NORM_BLOCK, "BLOCK_K": dora.NORM_BLOCK},
                     "unit_strides": [unit, "stride_ak"], "num_warps": dora.NORM_WARPS, "num_stages": 2, "arch": 90,
                     "smem_limit": SMALL_CARD_SMEM})
    return jobs


def _thin_jobs() -> list[dict]:
    """The down kernel with the tiles _down picks and the dB kernel with its tile, padded ranks 16 to 512; the
    down kernel also preparing the backward (B laid out, buffers zeroed) for q,v slices with fp32 parameters and
    a seed in memory, and the dB kernel for slices; the fp32-to-16-bit gradient conversion."""
    jobs = []
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        for r_pad in (16, 128, 256, 512):
            for block_m, block_k in {tuning.down_tile(rows, r_pad) for rows in (1, 4096)}:
                jobs.append({"kernel": "_lora_down_kernel", "dtype": dtype, "fp32_ptrs": ["h_ptr", "da_ptr", "db_ptr"],
                             "constexprs": {"DROPOUT": True, "SEED_FROM_PTR": False, "RS_PAD": r_pad,
                                            "H_PAD": r_pad, "GROUPS": 1, "SLICE_MASK": 1, "ENABLED": 1,
                                            "PRECISION": precision, "BLOCK_M": block_m, "BLOCK_K": block_k,
                                            "AUX_PROGRAMS": single.AUX_PROGRAMS, "bpad_ptr": None,
                                            "seed_ptr": None},
                             "unit_strides": ["stride_xk", "stride_ak"], "num_warps": 4, "num_stages": 2,
                             "arch": 90, "smem_limit": SMALL_CARD_SMEM})
        for r_pad in (16, 64, 512):
            side, stages = tuning.db_tile(r_pad)
            for atomic in (True, False):
                jobs.append({"kernel": "_lora_db_kernel", "dtype": dtype,
                             "fp32_ptrs": ["h_ptr"] + (["db_ptr"] if atomic else []),
                             "constexprs": {"ATOMIC": atomic, "RS_PAD": r_pad, "H_PAD": r_pad, "GROUPS": 1,
                                            "SLICE_MASK": 1, "PRECISION": precision, "BLOCK_N": side, "BLOCK_M": side,
                                            **DB_WITHOUT_DORA},
                             "unit_strides": ["stride_dyn"], "num_warps": 4, "num_stages": stages,
                             "arch": 90, "smem_limit": _db_smem_bytes(r_pad)})
    block_m, block_k = tuning.down_tile(4096, 32)
    jobs.append({"kernel": "_lora_down_kernel", "dtype": "bf16", "fp32_ptrs": ["h_ptr", "da_ptr", "db_ptr", "a_ptr",
                                                                            "b_ptr"],
                 "ptr_dtypes": {"seed_ptr": "i64"},
                 "constexprs": {"DROPOUT": True, "SEED_FROM_PTR": True, "RS_PAD": 16, "H_PAD": 32, "GROUPS": 3,
                                "SLICE_MASK": 5, "ENABLED": 2, "PRECISION": "tf32", "BLOCK_M": block_m,
                                "BLOCK_K": block_k, "AUX_PROGRAMS": single.AUX_PROGRAMS},
                 "unit_strides": ["stride_xk", "stride_ak", "stride_br"], "num_warps": 4, "num_stages": 2,
                 "arch": 90, "smem_limit": SMALL_CARD_SMEM})
    # an inference forward: no buffers to prepare, every pointer for them None (their loops must still compile)
    jobs.append({**jobs[-1], "constexprs": {**jobs[-1]["constexprs"], "SEED_FROM_PTR": False, "seed_ptr": None,
                                            "bpad_ptr": None, "da_ptr": None, "db_ptr": None}})
    side, stages = tuning.db_tile(16)
    jobs.append({"kernel": "_lora_db_kernel", "dtype": "bf16", "fp32_ptrs": ["h_ptr", "db_ptr"],
                 "constexprs": {"ATOMIC": True, "RS_PAD": 16, "H_PAD": 32, "GROUPS": 3, "SLICE_MASK": 5,
                                "PRECISION": "tf32", "BLOCK_N": side, "BLOCK_M": side, **DB_WITHOUT_DORA},
                 "unit_strides": ["stride_dyn"], "num_warps": 4, "num_stages": stages, "arch": 90,
                 "smem_limit": _db_smem_bytes(32)})
    jobs.append({"kernel": "_cast_pair_kernel", "dtype": "bf16", "fp32_ptrs": ["src1_ptr", "src2_ptr"],
                 "constexprs": {"BLOCK": 1024}, "unit_strides": [], "num_warps": 4, "num_stages": 1, "arch": 90,
                 "smem_limit": SMALL_CARD_SMEM})
    return jobs


MIXED_I32 = ["ids_ptr", "order_ptr", "thr_ptr", "seg_ptr", "sel_ptr"]
# The mixed GEMM's unit strides: forward (x, W.T as (in, out), B's stack as (R_PAD, out) per adapter, y) and dx
# (dy, W as (out, in), A's stack as (R_PAD, in), dx), for nn.Linear's and Conv1D's weight.
MIXED_GEMM_UNITS = {("forward", "linear"): ["stride_xk", "stride_wk", "stride_ur", "stride_on"],
                    ("forward", "conv1d"): ["stride_xk", "stride_wn", "stride_ur", "stride_on"],
                    ("dx", "linear"): ["stride_xk", "stride_wn", "stride_un", "stride_on"],
                    ("dx", "conv1d"): ["stride_xk", "stride_wk", "stride_un", "stride_on"]}


def _seed_place(dropout: bool, from_memory: bool) -> tuple[dict, dict]:
    """The constexprs and pointer dtypes of a dropout kernel's seed: read from memory (an int64) or passed as
    scalars (its pointer None), as the launchers pass it."""
    if dropout and from_memory:
        return {"SEED_FROM_PTR": True}, {"seed_ptr": "i64"}
    return {"SEED_FROM_PTR": False, "seed_ptr": None}, {}


def _mixed_gemm_job(direction, tile, r_pad, dtype, precision, layout="linear", odd=False, dropout=None,
                    seed_in_memory=False) -> dict:
    rows, cols, step, stages, warps = tile
    forward = direction == "forward"
    dropout = not forward if dropout is None else dropout
    seed, ptr_dtypes = _seed_place(dropout, seed_in_memory)
    return {"kernel": "_mixed_gemm_kernel", "dtype": dtype, "fp32_ptrs": ["l_ptr"], "i32_ptrs": MIXED_I32,
            "ptr_dtypes": ptr_dtypes,
            "constexprs": {"HAS_BIAS": forward, "DROPOUT": dropout, **seed, "R_PAD": r_pad, "PRECISION": precision,
                           "BLOCK_M": rows, "BLOCK_N": cols, "BLOCK_K": step, "GROUP_M": 8},
            "unit_strides": [] if odd else MIXED_GEMM_UNITS[direction, layout], "odd": odd,
            "num_warps": warps, "num_stages": stages, "arch": 90,
            "smem_limit": tuning.smem_bytes("mixed", tile, r_pad, 4 if dtype == "fp32" else 2)}


def _mixed_down_job(dtype, precision, r_pad, dropout, seed_in_memory=False) -> dict:
    """The mixed down kernel for h (A's stack, dropout) or g (B's stack, contiguous along the rank)."""
    block_m, block_k = tuning.down_tile(4096, r_pad)
    seed, ptr_dtypes = _seed_place(dropout, seed_in_memory)
    return {"kernel": "_mixed_down_kernel", "dtype": dtype, "fp32_ptrs": ["factor_ptr", "h_ptr"],
            "i32_ptrs": MIXED_I32, "ptr_dtypes": ptr_dtypes,
            "unit_strides": ["stride_xk", "stride_ak" if dropout else "stride_ar"],
            "constexprs": {"DROPOUT": dropout, **seed, "R_PAD": r_pad, "PRECISION": precision, "BLOCK_M": block_m,
                           "BLOCK_K": block_k},
            "num_warps": 4, "num_stages": 2, "arch": 90, "smem_limit": SMALL_CARD_SMEM}


def _mixed_grad_job(dtype, precision, r_pad, da, atomic, seed_in_memory=False) -> dict:
    """The mixed dA (dropout) or dB reduction, stored or atomic."""
    side, stages = tuning.db_tile(r_pad)
    seed, ptr_dtypes = _seed_place(da, seed_in_memory)
    return {"kernel": "_mixed_grad_kernel", "dtype": dtype, "fp32_ptrs": ["out_ptr", "l_ptr" if da else "r_ptr"],
            "i32_ptrs": MIXED_I32, "ptr_dtypes": ptr_dtypes, "unit_strides": ["stride_lp", "stride_rq"],
            "constexprs": {"DA": da, "DROPOUT": da, **seed, "ATOMIC": atomic, "PRECISION": precision,
                           "BLOCK_P": r_pad if da else side, "BLOCK_Q": side if da else r_pad,
                           "BLOCK_M": 16 if da and dtype == "fp32" else side},
            "num_warps": 4, "num_stages": stages, "arch": 90, "smem_limit": _db_smem_bytes(r_pad)}


def _mixed_stack_job(dtype, a_dtypes, r_pad, selected=True, zeroed=True) -> dict:
    """The stacking kernel over adapters of these dtypes (contiguous, ranks and strides as the JIT sees them: A's
    row stride a multiple of 16, unit column strides), writing the selected adapters and zeroing buffers or not."""
    n = len(a_dtypes)
    constexprs = {"R_PAD": r_pad, "BLOCK": max(16, min(128, 4096 // r_pad))}
    if not selected:
        constexprs["sel_ptr"] = None
    if not zeroed:
        constexprs["zero_ptr"] = None
    return {"kernel": "_mixed_stack_kernel", "dtype": dtype, "fp32_ptrs": ["factor_ptr", "zero_ptr"],
            "i32_ptrs": ["thr_ptr", "sel_ptr"], "unit_strides": [], "constexprs": constexprs,
            "tuples": {"a_ptrs": ["*" + d for d in a_dtypes], "b_ptrs": ["*" + d for d in a_dtypes],
                       "ranks": ["i32"] * n, "a_strides": ["i32:16", 1] * n, "b_strides": ["i32", 1] * n,
                       "factors": ["fp32"] * n, "thresholds": ["i32"] * n},
            "num_warps": 4, "num_stages": 1, "arch": 90, "smem_limit": SMALL_CARD_SMEM}


def _mixed_jobs() -> list[dict]:
    """The mixed-adapter kernels: the GEMM forward (bias) and dx (with and without dropout) at every 16-bit
    tile and the fp32 ones at padded rank 16, at 64 where kept, for both weight layouts and an odd layer;
    the down kernel for h (A's stack, dropout) and g (B's stack, contiguous along the rank); the dA and dB
    reductions, stored and atomic; every dropout variant also with the seed read from memory (a CUDA graph's);
    the stacking kernel for one, four and twenty adapters (16-bit and fp32 LoRA parameters), with and without
    the backward's extra work."""
    jobs = []
    for family in ("16bit", "16bit-small-m", "fp32"):
        dtype, precision = _dtype_precision(family)
        for tile in tuning.TILES[family]:
            jobs += [_mixed_gemm_job(direction, tile, 16, dtype, precision) for direction in ("forward", "dx")]
        for tile in tuning.fitting_tiles("mixed", family, 64, H100_SMEM)[:1]:
            jobs += [_mixed_gemm_job(direction, tile, 64, dtype, precision) for direction in ("forward", "dx")]
    small = tuning.TILES["16bit-small-m"][0]
    jobs += [_mixed_gemm_job(direction, small, 16, "fp16", "tf32", layout="conv1d") for direction in ("forward", "dx")]
    jobs += [_mixed_gemm_job("dx", small, 16, "bf16", "tf32", dropout=False),
             _mixed_gemm_job("dx", small, 16, "fp16", "tf32", odd=True),
             _mixed_gemm_job("dx", small, 16, "bf16", "tf32", seed_in_memory=True),
             _mixed_gemm_job("dx", tuning.TILES["16bit"][0], 16, "bf16", "tf32", seed_in_memory=True)]
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        for r_pad in (16, 64, 256):
            jobs += [_mixed_down_job(dtype, precision, r_pad, dropout) for dropout in (True, False)]
        jobs.append(_mixed_down_job(dtype, precision, 16, True, seed_in_memory=True))
        for r_pad in (16, 64):
            jobs += [_mixed_grad_job(dtype, precision, r_pad, da, atomic) for da in (True, False)
                     for atomic in (True, False)]
        jobs.append(_mixed_grad_job(dtype, precision, 16, True, True, seed_in_memory=True))
        for r_pad in (16, 64, 512):
            jobs += [_mixed_stack_job(dtype, [dtype], r_pad),
                     _mixed_stack_job(dtype, ["fp32"] * 4, r_pad, selected=False, zeroed=False)]
    jobs.append(_mixed_stack_job("bf16", ["fp32"] * 20, 64))
    return jobs


def _hopper_job(tile, h_pad=16, dtype="bf16", odd=False, b_dtype=None, **flags) -> dict:
    """The persistent TMA forward kernel (_hopper.py) for sm_90: an nn.Linear layer with bias, no slices."""
    rows, cols, step, stages, warps, subtiles = tile
    constexprs = {"HAS_BIAS": True, "W_T": False, "RS_PAD": h_pad, "H_PAD": h_pad, "GROUPS": 1, "SLICE_MASK": 1,
                  "BLOCK_M": rows, "BLOCK_N": cols, "BLOCK_K": step, "GROUP_M": 8, "SUBTILES": subtiles, **flags}
    return {"kernel": "_hopper_forward_kernel", "module": "_hopper", "dtype": dtype, "constexprs": constexprs,
            "fp32_ptrs": ["h_ptr"] + (["b_ptr"] if b_dtype == "fp32" else []), "unit_strides": ["stride_br"],
            "odd": odd, "num_warps": warps, "num_stages": stages, "arch": 90,
            "smem_limit": min(H100_SMEM, tuning.smem_bytes("hopper forward", tile, h_pad, 2))}


def _hopper_dx_job(tile, h_pad=16, dtype="bf16", a_dtype=None, **flags) -> dict:
    """The persistent dx kernel (_hopper.py) for sm_90: dx and dA with dropout, an nn.Linear weight, no slices."""
    rows, cols, step, stages, warps, subtiles = tile
    constexprs = {"NEED_DA": True, "DROPOUT": True, "SEED_FROM_PTR": False, "W_T": False, "RS_PAD": h_pad,
                  "H_PAD": h_pad, "ENABLED": 1, "BLOCK_M": rows, "BLOCK_K": cols, "BLOCK_N": step, "GROUP_M": 8,
                  "SUBTILES": subtiles, **flags}
    if not constexprs["SEED_FROM_PTR"]:
        constexprs["seed_ptr"] = None
    return {"kernel": "_hopper_dx_kernel", "module": "_hopper", "dtype": dtype, "constexprs": constexprs,
            "fp32_ptrs": ["da_ptr"] + (["a_ptr"] if a_dtype == "fp32" else []), "ptr_dtypes": {"seed_ptr": "i64"},
            "unit_strides": ["stride_ak", "stride_xk"], "odd": False, "num_warps": warps, "num_stages": stages,
            "arch": 90, "smem_limit": min(H100_SMEM, tuning.smem_bytes("hopper dx", tile, h_pad, 2))}


def _hopper_jobs() -> list[dict]:
    """The persistent forward: every config an H100/H200 may run (bf16, padded rank 16); the first with fp16, a
    Conv1D weight (W_T) and no bias; with q,v slices at rank 16 and fp32 LoRA parameters; at the largest padded
    rank it is kept for; and for a layer whose sizes are no multiples of 16 (no divisibility hints). The
    persistent dx: every config with dA and dropout; the first in fp16 with a Conv1D weight, dx alone, no dropout;
    and for q,v slices with fp32 LoRA parameters and the seed read from memory."""
    tiles = tuning.fitting_tiles("hopper forward", "large", 16, H100_SMEM) + \
        tuning.fitting_tiles("hopper forward", "small-m", 16, H100_SMEM)
    first = tiles[0]
    largest = max(h_pad for h_pad in (16, 32, 64, 128, 256)
                  if first in tuning.fitting_tiles("hopper forward", "large", h_pad, H100_SMEM))
    jobs = [_hopper_job(tile) for tile in tiles]
    jobs += [_hopper_job(first, dtype="fp16", W_T=True, HAS_BIAS=False),
             {**_hopper_job(first, h_pad=32, b_dtype="fp32", GROUPS=3, SLICE_MASK=5), "odd": False},
             _hopper_job(first, h_pad=largest), _hopper_job(first, odd=True)]
    jobs[-3]["constexprs"]["RS_PAD"] = 16
    dx_tiles = tuning.fitting_tiles("hopper dx", "large", 16, H100_SMEM) + \
        tuning.fitting_tiles("hopper dx", "small-m", 16, H100_SMEM)
    jobs += [_hopper_dx_job(tile) for tile in dx_tiles]
    jobs += [_hopper_dx_job(dx_tiles[0], dtype="fp16", W_T=True, DROPOUT=False, NEED_DA=False),
             _hopper_dx_job(dx_tiles[0], h_pad=32, a_dtype="fp32", ENABLED=2, SEED_FROM_PTR=True)]
    jobs[-1]["constexprs"]["RS_PAD"] = 16
    return jobs


def test_fallback_tile_fits_small_cards_up_to_rank_256():
    for backward in (False, True):
        for elem in (2, 4):
            assert tuning.smem_bytes(_role(backward), tuning.FALLBACK_TILE, 256, elem) <= SMALL_CARD_SMEM


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile and run in the other tests")
def test_every_kernel_config_compiles_within_its_shared_memory(tmp_path):
    """Compile (no GPU needed) every config an H100/H200 may run for sm_90, those a 100 KB card keeps for sm_86,
    and every variant of the backward kernel for layers with and without 16-divisible sizes: each compiles;
    asks for no more shared memory than its estimate (the one the tile filter uses for the GEMMs, db_tile's
    bound for dB) or, for the down and stacking kernels, than any GPU has; keeps its pipelined loops free of
    branches and (sm_90) of reads of refilled slots; has machine code that reads no uniform register before writing it;
    pipelines its loads (B's tile also when dy's and W's cannot be); runs 16-bit GEMMs on tensor cores (wgmma
    for sm_90 tiles of 64+ rows, mma.sync on sm_86); the persistent kernels (_hopper.py) load through TMA into
    wgmma that ptxas does not serialize, without spills; writes dx, dA and dB with the stores or reductions the
    launcher expects; reports ptxas's register count; spills as the comments below say.

    The compiler is the installed triton's, or the one of the triton in FASTLORA_COMPILE_PYTHON's environment
    (e.g. a throwaway venv with the release a GPU machine runs: releases' ptxas differ, docs/triton-notes.md)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this triton has no ahead-of-time compile API: {error}")
    jobs = list({json.dumps(job, sort_keys=True): job
                 for job in _gemm_jobs() + _thin_jobs() + _variant_jobs() + _mixed_jobs() + _hopper_jobs()
                 + _dora_jobs()}.values())
    kernels_path = os.path.join(os.path.dirname(triton_backend.__file__), "_kernels.py")
    script = os.path.join(os.path.dirname(__file__), "compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")  # uncached: ptxas runs, logs registers
    python = os.environ.get("FASTLORA_COMPILE_PYTHON", sys.executable)
    # its own process group: on a timeout the compile pool's workers are killed too, not left running for an hour
    with subprocess.Popen([python, script, kernels_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, text=True, start_new_session=True) as compiler:
        try:
            stdout, stderr = compiler.communicate(json.dumps(jobs), timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(compiler.pid, signal.SIGKILL)
            raise
    assert compiler.returncode == 0, stderr[-3000:]
    reports = [json.loads(line) for line in stdout.splitlines()]
    assert len(reports) == len(jobs) > 50
    spills = {}  # bf16 at padded rank 16 (ranks up to 16), every flag on: kernel -> each config's spill bytes
    mixed_spills = {}  # mixed kernels: the forward GEMM's, dx's, the down kernel's at padded rank 16, dA/dB's
    for job, report in zip(jobs, reports, strict=True):
        flags = job["constexprs"]
        name = f"{job['kernel']} {job['dtype']} {flags} stages={job['num_stages']}{' odd' if job.get('odd') else ''}"
        assert report["error"] is None, f"{name}: {report['error']}"
        assert report["shared"] <= job["smem_limit"], f"{name}: {report['shared']} > {job['smem_limit']} bytes"
        if job["kernel"].startswith("_hopper"):  # TMA copies feeding wgmma, which ptxas did not serialize
            assert report["tma"] and report["wgmma"] and not report["wgmma_serialized"], f"{name}: {report}"
            assert report["spill_stores"] == 0, f"{name}: {report['spill_stores']} bytes spilled"
            assert report["reduction"] == flags.get("NEED_DA", False), name  # dA's atomic adds, only when asked
            continue
        if job["kernel"] == "_cast_pair_kernel":  # no loop, nothing to pipeline: plain loads and stores
            assert report["store"] and not report["reduction"], name
            continue
        if job["kernel"] == "_mixed_stack_kernel":  # copies: plain loads and stores, no spills
            assert report["store"] and not report["reduction"] and report["spill_stores"] == 0, f"{name}: {report}"
            continue
        if flags.get("DORA") or flags.get("NEED_DM") or job["kernel"] == "_dora_norm_kernel":
            _check_dora_report(job, report, name)
            continue
        # Odd sizes leave loads too narrow to copy asynchronously, but those of padded tiles (B's, h's).
        if not job.get("odd") or job["kernel"] == "_lora_backward_kernel":
            assert report["cp_async"], f"{name}: loads not pipelined"
        if job["kernel"] in ("_lora_forward_kernel", "_lora_backward_kernel", "_mixed_gemm_kernel"):
            tensor_cores = report["wgmma"] if job["arch"] == 90 else report["mma"] and not report["wgmma"]
            assert tensor_cores == (job["dtype"] != "fp32" and (flags["BLOCK_M"] >= 64 or job["arch"] != 90)), \
                f"{name} sm_{job['arch']}: {'wgmma' if job['arch'] == 90 else 'mma.sync'}"
        if job["kernel"] == "_lora_backward_kernel":
            assert report["reduction"] == flags["NEED_DA"] and report["store"] == flags["NEED_DX"], name
        if job["kernel"] in ("_lora_db_kernel", "_mixed_grad_kernel"):
            assert report["reduction"] == flags["ATOMIC"] and report["store"] != flags["ATOMIC"], name
        if job["kernel"] in ("_mixed_gemm_kernel", "_mixed_down_kernel"):
            assert report["store"] and not report["reduction"], name
        if job["kernel"].startswith("_mixed"):
            if job["kernel"] == "_mixed_gemm_kernel" and not flags["HAS_BIAS"]:
                mixed_spills.setdefault("dx", []).append(report["spill_stores"])
            elif job["kernel"] != "_mixed_down_kernel" or flags["R_PAD"] == 16:
                mixed_spills.setdefault(job["kernel"], []).append(report["spill_stores"])
            continue
        assert report["registers"] is not None, f"{name}: no ptxas register count"
        if job["arch"] == 90 and job["dtype"] == "bf16" and flags.get("H_PAD") == 16 and not job.get("odd") \
                and all(flags.get(k, True) for k in ("HAS_BIAS", "NEED_DX", "NEED_DA", "ATOMIC")) \
                and (flags.get("DROPOUT", True) or job["kernel"] == "_lora_forward_kernel"):  # (LoRA's: no dropout)
            spills.setdefault(job["kernel"], []).append(report["spill_stores"])
    assert set(spills) == {"_lora_forward_kernel", "_lora_backward_kernel", "_lora_down_kernel", "_lora_db_kernel"}
    assert all(s == 0 for kernel, found in spills.items() if kernel != "_lora_backward_kernel" for s in found), spills
    assert set(mixed_spills) == {"_mixed_gemm_kernel", "dx", "_mixed_down_kernel", "_mixed_grad_kernel"}
    assert all(s == 0 for kernel, found in mixed_spills.items() if kernel != "dx" for s in found), mixed_spills
    assert 0 in mixed_spills["dx"], mixed_spills  # as the backward's, dx with dropout spills on the widest tiles
    # With dropout the backward's widest tiles spill (the masked rank-R term needs a second tile-sized fp32
    # temporary); the autotuner, keyed on DROPOUT, measures them against the spill-free ones.
    assert 0 in spills["_lora_backward_kernel"], spills


def _check_dora_report(job: dict, report: dict, name: str) -> None:
    """DoRA's variants: none spills (the forward's and the dropout GEMMs' tile tables keep only tiles that do
    not); the GEMMs run on tensor cores in 16-bit and pipeline their loads; dx, dA,
    dB and dm are written as the launcher expects (the dm-only dB variant, for a frozen B, has no dot and so
    nothing it must pipeline). The norm kernel's loop (one pass over W per forward) is not required to pipeline:
    with 16-bit LoRA parameters Triton 3.9 does not."""
    flags = job["constexprs"]
    assert report["spill_stores"] == 0, f"{name}: {report['spill_stores']} bytes spilled"
    if job["kernel"] in ("_lora_forward_kernel", "_lora_backward_kernel"):
        assert report["cp_async"] and report["wgmma"] == (job["dtype"] != "fp32" and flags["BLOCK_M"] >= 64), name
    if job["kernel"] == "_lora_backward_kernel":
        assert report["reduction"] == flags["NEED_DA"] and report["store"] == flags["NEED_DX"], name
    if job["kernel"] == "_lora_db_kernel":
        assert report["reduction"] == flags["ATOMIC"] and report["store"] != flags["ATOMIC"], name
        assert report["cp_async"] == flags["NEED_DB"], name
    if job["kernel"] == "_dora_norm_kernel":
        assert report["store"] and not report["reduction"], name


# Abridged from the SASS that ptxas 12.8 (Triton 3.6) made of the old dx-only backward kernel for sm_90a: the
# wgmma descriptors of B's k-steps 1-3 are UR22:UR23 + 0x20 * k, and no path writes UR22:UR23 first.
MISCOMPILED_SASS = """
        /*0050*/                   UMOV UR28, 0x400 ;
        /*0080*/                   S2UR UR4, SR_CgaCtaId ;
        /*00b0*/                   ULEA UR28, UR4, UR28, 0x18 ;
        /*0900*/               @P2 BRA 0xab0 ;
        /*0930*/                   USHF.R.U32.HI UR16, URZ, 0x4, UR28 ;
        /*0aa0*/                   BRA 0x7480 ;
        /*0ab0*/                   USHF.R.U32.HI UR16, URZ, 0x4, UR28 ;
        /*0bd0*/                   UIADD3 UR22, UP0, UR22, 0x20, URZ ;
        /*0c20*/                   UIADD3.X UR23, UR23, -0x3ffffff0, URZ, UP0, !UPT ;
        /*0c40*/                   UIADD3 UR12, UP2, UR16, 0x2, URZ ;
        /*4310*/                   UIADD3.X UR13, URZ, 0x40000040, URZ, UP2, !UPT ;
        /*4320*/                   ULDC.64 UR8, c[0x0][0x218] ;
        /*6a20*/                   UMOV UR20, UR12 ;
        /*6a30*/                   UMOV UR21, UR13 ;
        /*6a40*/                   HGMMA.64x16x16.F32 R24, gdesc[UR20].tnspB, R24 ;
        /*6a50*/                   LDG.E.U16 R2, desc[UR8][R4.64] ;
        /*7470*/               @P3 BRA 0x6a20 ;
        /*7480*/                   EXIT ;
"""


def test_sass_check_finds_reads_of_uniform_registers_nothing_wrote():
    compile_kernels = pytest.importorskip("compile_kernels", exc_type=ImportError)
    assert compile_kernels.undefined_uniform_reads(MISCOMPILED_SASS) == [
        "/*0bd0*/ UIADD3 UR22, UP0, UR22, 0x20, URZ", "/*0c20*/ UIADD3.X UR23, UR23, -0x3ffffff0, URZ, UP0, !UPT"]
    sound = MISCOMPILED_SASS.replace("UR22, UP0, UR22", "UR22, UP0, UR16").replace("UR23, UR23", "UR23, URZ")
    assert compile_kernels.undefined_uniform_reads(sound) == []
    # Written on one path only: a zero-trip path jumping into the loop would read four registers it never wrote.
    one_path = sound.replace("BRA 0x7480", "BRA 0x6a20")
    assert [line[:8] for line in compile_kernels.undefined_uniform_reads(one_path)] == [
        "/*6a20*/", "/*6a30*/", "/*6a40*/", "/*6a50*/"]


def _calls(node: ast.AST) -> set[str]:
    """The dotted name of every call under a node (``tl.dot``)."""
    return {ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}


def test_kernels_follow_the_rules_the_interpreter_cannot_check():
    """_kernels.py's GPU rules: loops branch only on constexprs and hold no atomics; no tl.trans anywhere."""
    kernels_path = os.path.join(os.path.dirname(triton_backend.__file__), "_kernels.py")
    with open(kernels_path) as source:
        tree = ast.parse(source.read())
    loops = [node for node in ast.walk(tree) if isinstance(node, ast.For)
             and ast.unparse(node.iter).split("(")[0] != "tl.static_range"]  # unrolled at compile time
    assert len(loops) == 15  # the down, backward and dB kernels' loops, the base product shared by the two GEMMs
    # (with DoRA's dropped-out product), DoRA's norms, the down kernel's three preparing the backward (stores only),
    # the mixed kernels' four others, and the stacking kernel's three (copies and zeroing only)
    for loop in loops:
        for node in ast.walk(loop):
            if isinstance(node, ast.If):
                assert isinstance(node.test, ast.Name) and node.test.id.isupper(), ast.unparse(node.test)
        assert not {call for call in _calls(loop) if call.startswith("tl.atomic")}, ast.unparse(loop)[:200]
    assert "tl.trans" not in _calls(tree)


@pytest.mark.parametrize("role", list(tuning.ROLES))
def test_tile_filter_keeps_only_tiles_whose_shared_memory_and_register_estimates_fit(role):
    """The filter against the estimates it uses (smem_bytes, register_values), for every autotuned GEMM: every kept
    tile's estimates fit, all tiles are kept where all fit (padded rank 16 on an H100); where none does, the fallback
    tile is what is left for the tiled and mixed GEMMs and nothing for the persistent ones (the tiled kernel runs).
    The shared-memory estimate meets the compiled kernels in test_every_kernel_config_compiles_within_its_shared_memory
    (no kept config asks for more than its estimate); it is an upper bound, not a tight one, so a dropped tile may
    still fit."""
    families = tuning.ROLES[role].tiles
    persistent = role.startswith("hopper")
    for family in families:
        assert tuning.fitting_tiles(role, family, 16, H100_SMEM) == tuple(families[family])
        elem = 4 if family.startswith("fp32") else 2
        for r_pad in (16, 64, 256):
            for smem in (H100_SMEM, SMALL_CARD_SMEM):
                tiles = tuning.fitting_tiles(role, family, r_pad, smem)
                assert tiles or persistent
                assert all(tuning.smem_bytes(role, t, r_pad, elem) <= smem for t in tiles)
                assert all(tuning.register_values(role, t, r_pad) <= tuning.REGISTER_BUDGET[elem] for t in tiles)
    if persistent:
        assert tuning.fitting_tiles(role, "large", 256, SMALL_CARD_SMEM) == ()
    elif not role.startswith("dropped"):  # (DoRA-with-dropout's one fp32 tile is small enough for rank 256)
        assert tuning.fitting_tiles(role, "fp32", 256, H100_SMEM) == (tuning.FALLBACK_TILE,)


def test_float64_is_never_taken_for_a_16_bit_dtype():
    """The planner sizes tiles by element size: fp64 has none among the kernels' dtypes, so it is refused, never
    planned as 16-bit (the backend's DTYPES leave it to the reference)."""
    assert tuning.family("forward", 10, torch.float32) == "fp32-small-m"
    assert tuning.family("mixed", 2048, torch.bfloat16) == "16bit"
    for call in (lambda: tuning.family("backward", 10, torch.float64), lambda: tuning.precision(torch.float64),
                 lambda: tuning.family("hopper dx", 10, torch.float64)):
        with pytest.raises(TypeError, match="float64"):
            call()
    assert torch.float64 not in triton_backend.DTYPES


@pytest.mark.parametrize("role", list(tuning.ROLES))
def test_autotuning_keys_on_the_variant_not_on_the_row_count(role):
    """A dropout-free call (eval) must not fix the config that a training call then uses; a new M must not re-tune;
    where a seed comes from (scalars or memory) is no part of any key."""
    family = next(iter(tuning.ROLES[role].tiles))
    tuned = tuning.tuner(role, family, 16, H100_SMEM)
    assert set(tuned.keys) == set(tuning.ROLES[role].key) and {"N", "K"} <= set(tuned.keys)
    assert "M" not in tuned.keys and "SEED_FROM_PTR" not in tuned.keys
    assert ("DROPOUT" in tuned.keys) == (role in ("backward", "mixed", "hopper dx"))
    assert tuning.tuner(role, family, 16, H100_SMEM) is tuned


def test_tuned_configs_reports_each_choice_with_its_key():
    """One report for every autotuned kernel: the tiled backward's and the persistent forward's choices alike."""
    before = tuning.tuned_configs()
    backward = tuning.tuner("backward", "16bit", 16, H100_SMEM)
    persistent = tuning.tuner("hopper forward", "large", 32, H100_SMEM)
    backward_key = (3072, 1024, True, True, False, False, "torch.bfloat16", "torch.float32")
    persistent_key = (4096, 1024, True, False, 16, 32, 3, 5, "torch.bfloat16")
    backward.cache[backward_key] = backward.configs[2]
    persistent.cache[persistent_key] = persistent.configs[0]
    try:
        added = [entry for entry in tuning.tuned_configs() if entry not in before]
    finally:
        del backward.cache[backward_key], persistent.cache[persistent_key]
    rows, cols, step, stages, warps = tuning.TILES["16bit"][2]
    p_rows, p_cols, p_step, p_stages, p_warps, subtiles = tuning.HOPPER_TILES["large"][0]
    assert added == [
        {"kernel": "backward", "family": "16bit", "r_pad": 16,
         "key": {"N": 3072, "K": 1024, "NEED_DX": True, "NEED_DA": True, "DROPOUT": False, "DORA": False},
         "dtypes": ["torch.bfloat16", "torch.float32"],
         "tile": {"BLOCK_M": rows, "BLOCK_K": cols, "BLOCK_N": step, "GROUP_M": 8},
         "num_warps": warps, "num_stages": stages},
        {"kernel": "hopper forward", "family": "large", "r_pad": 32,
         "key": {"N": 4096, "K": 1024, "HAS_BIAS": True, "W_T": False, "RS_PAD": 16, "H_PAD": 32, "GROUPS": 3,
                 "SLICE_MASK": 5}, "dtypes": ["torch.bfloat16"],
         "tile": {"BLOCK_M": p_rows, "BLOCK_N": p_cols, "BLOCK_K": p_step, "GROUP_M": 8, "SUBTILES": subtiles},
         "num_warps": p_warps, "num_stages": p_stages}]
    assert tuning.tuned_configs() == before
    assert triton_backend.tuned_configs is tuning.tuned_configs


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU benchmarks/gpu_check.sh runs the real benchmark")
def test_training_step_benchmark_runs_through_the_triton_kernels(tmp_path):
    """benchmarks/bench_train_step.py --smoke with the triton backend forced (interpreted on the CPU): the steps of
    fastlora and peft+accelerate run through the triton kernels beside the floor, and their rows are appended."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_train_step.py")
    results = tmp_path / "all.csv"
    env = {**os.environ, "FASTLORA_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    variants = "floor,fastlora,peft+accelerate"  # those through the kernels (DoRA's: tests/test_dora_triton.py)
    result = subprocess.run([sys.executable, script, "--smoke", "--device", "cpu", "--variants", variants,
                             "--csv", str(results)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with results.open(newline="") as f:
        rows = list(csv.DictReader(f))
    throughput = {row["contender"]: float(row["value"]) for row in rows if row["metric"] == "throughput"}
    assert set(throughput) == {"floor", "fastlora", "peft+accelerate"}, result.stderr[-3000:]
    assert throughput["fastlora"] < throughput["floor"]  # its c_attn runs interpreted kernels


def _mixed_operands(rows, n_in, n_out, ranks, dtype, layout, seed=0):
    """x, weight (nn.Linear's (out, in) or a Conv1D-style transposed view), bias and one adapter per rank."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)

    weight = rand(n_out, n_in, scale=n_in**-0.5) if layout == "linear" else rand(n_in, n_out, scale=n_in**-0.5).t()
    As = [rand(r, n_in, scale=n_in**-0.5) for r in ranks]
    Bs = [rand(n_out, r, scale=r**-0.5) for r in ranks]
    return rand(rows, n_in), weight, rand(n_out), As, Bs


def _check_mixed(rows, ids, ranks, dtype, layout, p, need_dx=True, need_lora=None, n_in=40, n_out=56):
    """forward_mixed and backward_mixed against the reference's in float64: every output, None where expected."""
    x, weight, bias, As, Bs = _mixed_operands(rows, n_in, n_out, ranks, dtype, layout, seed=len(ranks) + rows)
    ids = torch.as_tensor(ids, dtype=torch.int64, device=DEVICE)
    scales = [0.5 + 0.25 * (a % 5) for a in range(len(ranks))]
    ps = [p * (a % 3) / 2 for a in range(len(ranks))]  # 0, p/2, p: adapters without dropout among those with
    need_lora = need_lora if need_lora is not None else [True] * len(ranks)
    named = set(ids.tolist())
    need_lora = [need and a in named for a, need in enumerate(need_lora)]  # as the op asks: named adapters only
    seed = torch.tensor(1234)
    routing = AdapterRouting(ids, len(ranks)).rows((rows,), x.device)
    doubled = [[t.double() for t in ts] for ts in (As, Bs)]
    got = triton_backend.forward_mixed(x, weight, bias, As, Bs, scales, ps, routing, seed)
    expected = reference.forward_mixed(x.double(), weight.double(), bias.double(), *doubled, scales, ps, routing,
                                       seed)
    assert got.dtype == dtype and rel_err(got, expected) <= TOLERANCE[dtype], f"y error {rel_err(got, expected):.2e}"
    grad_out = torch.randn(rows, n_out, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    dx, dAs, dBs = triton_backend.backward_mixed(grad_out, x, weight, As, Bs, scales, ps, routing, seed, need_dx,
                                                 need_lora)
    ref_dx, ref_dAs, ref_dBs = reference.backward_mixed(grad_out.double(), x.double(), weight.double(), *doubled,
                                                        scales, ps, routing, seed, need_dx, need_lora)
    assert (dx is None) == (not need_dx)
    if need_dx:
        assert dx.dtype == dtype and rel_err(dx, ref_dx) <= TOLERANCE[dtype], f"dx error {rel_err(dx, ref_dx):.2e}"
    for a in range(len(ranks)):
        assert (dAs[a] is None) == (dBs[a] is None) == (not (need_lora[a] and a in named)), a
        if dAs[a] is not None:
            for name, g, e in (("dA", dAs[a], ref_dAs[a]), ("dB", dBs[a], ref_dBs[a])):
                assert g.dtype == dtype and g.shape == e.shape, name
                assert rel_err(g, e) <= TOLERANCE[dtype], f"{name}[{a}] error {rel_err(g, e):.2e}"


MIXED_RANKS = [1, 64, 3, 16, 8, 2, 33, 5, 1, 12, 7, 64, 4, 20, 1, 9, 17, 6, 2, 48]  # 20 adapters, ranks 1 to 64


def _mixed_ids(rows: int, seed: int = 0) -> torch.Tensor:
    """Random ids over the 20 adapters and -1, one adapter named by no row (10), and adapter 3 on a run of 75
    rows: its sorted segment crosses several 32-row tiles and dA/dB row splits."""
    ids = torch.randint(-1, len(MIXED_RANKS), (rows,), generator=torch.Generator().manual_seed(seed))
    ids[ids == 10] = 3
    ids[20:95] = 3
    return ids


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_twenty_adapters_of_ranks_1_to_64(layout, p, dtype):
    """20 adapters (padded to rank 64) in a 150-row batch whose sorted tiles each meet several segments."""
    _check_mixed(150, _mixed_ids(150), MIXED_RANKS, dtype, layout, p)


@pytest.mark.parametrize("rows", [1, 37])
def test_mixed_rows_without_adapters_are_the_base_layer(rows):
    _check_mixed(rows, [-1] * rows, [4, 2], torch.float32, "linear", 0.2)


@pytest.mark.parametrize("adapter", [-1, 0, 2])
def test_mixed_single_row(adapter):
    _check_mixed(1, [adapter], [4, 9, 1], torch.float32, "conv1d", 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_dx, need_lora", [
    (True, [False] * 4), (False, [True] * 4), (False, [True, False, False, True]), (True, [False, True, True, False])])
def test_mixed_backward_computes_only_what_is_needed(need_dx, need_lora, dtype):
    ids = [0, 1, 3, 3, -1, 0, 1, 1, 3, 0] * 7  # adapter 2: no row
    _check_mixed(len(ids), ids, [5, 16, 2, 40], dtype, "linear", 0.25, need_dx, need_lora)


def test_mixed_more_adapters_than_one_stacking_launch_takes():
    """40 adapters: two stacking launches, the second writing its selected adapters after the first's."""
    ranks = [1 + a % 7 for a in range(40)]
    assert len(ranks) > mixed.MAX_STACKED
    ids = torch.randint(-1, len(ranks), (90,), generator=torch.Generator().manual_seed(2))
    _check_mixed(90, ids, ranks, torch.float32, "linear", 0.2, need_lora=[a % 3 != 1 for a in range(len(ranks))])


def test_mixed_one_adapter_over_every_row_spans_many_tiles():
    """One segment over 4.5 tiles of the GEMM and several dA/dB splits, no rows of other adapters."""
    _check_mixed(150, [1] * 150, [3, 6], torch.float16, "conv1d", 0.1)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_mixed_kernels_mask_is_bit_identical_to_reference(seed):
    """With W = 0, x = 1 and each adapter's A and B the identity, row i of the output is its adapter's keep-mask
    times 1/(1-p) of that adapter's p, zero for rows without adapter."""
    rows, cols, ps = 50, 16, [0.3, 0.0, 0.7]
    ids = torch.tensor([a % 4 - 1 for a in range(rows)], device=DEVICE)  # -1, 0, 1, 2, -1, ...
    eye = torch.eye(cols, device=DEVICE)
    x, weight = torch.ones(rows, cols, device=DEVICE), torch.zeros(cols, cols, device=DEVICE)
    routing = AdapterRouting(ids, 3).rows((rows,), x.device)
    y = triton_backend.forward_mixed(x, weight, None, [eye] * 3, [eye] * 3, [1.0] * 3, ps, routing,
                                     torch.tensor(seed))
    for a, p in enumerate(ps):
        rows_a = ids == a
        keep = dropout_keep_mask(torch.tensor(seed), rows, cols, p, torch.device(DEVICE))[rows_a]
        assert torch.equal(y[rows_a] != 0, keep)
        assert torch.all(y[rows_a][keep] == torch.tensor(1 / (1 - p), dtype=torch.float32))
    assert not y[ids == -1].any()


def _host_reads():
    """A dispatch mode that records every read of a tensor's value back to the host (``int(seed)``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))
    return HostReads()


def _both_seed_places(monkeypatch, run, seed: int):
    """``run(seed_tensor)`` with the seed passed to the kernels as two scalars (a CPU tensor, read on the host)
    and read by them from memory (on x's device, never read back): both results."""
    monkeypatch.setattr(single, "SEED_IN_MEMORY_ON", frozenset())
    by_value = run(torch.tensor(seed))
    monkeypatch.setattr(single, "SEED_IN_MEMORY_ON", frozenset({"cpu", "cuda"}))
    on_device = torch.tensor(seed, device=DEVICE)
    assert single.seed_args(on_device)["SEED_FROM_PTR"]
    with _host_reads() as reads:
        from_memory = run(on_device)
    assert reads.count == 0, "the seed was read back to the host"
    return by_value, from_memory


@pytest.mark.parametrize("seed", [12345, (7 << 32) + 99, -3])
def test_single_adapter_seed_from_memory_is_bit_identical(monkeypatch, seed):
    """The single-adapter kernels give the same output and gradients, bit for bit, whether the seed comes as
    scalars or is read from memory (as inside a CUDA graph): the down, forward, backward and dB kernels."""
    x, weight, bias, lora_A, lora_B = _operands(45, 40, 56, 5, torch.float32)
    grad = torch.randn(45, 56, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def run(seed_tensor):
        needs = (True, True, True)
        y, saved = triton_backend.forward(x, weight, bias, lora_A, lora_B, 0.7, 0.3, seed_tensor, None, needs)
        return (y, *triton_backend.backward(grad, x, weight, lora_A, lora_B, 0.7, 0.3, seed_tensor, needs, None,
                                            saved))
    by_value, from_memory = _both_seed_places(monkeypatch, run, seed)
    for a, b in zip(by_value, from_memory, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [12345, (7 << 32) + 99, -3])
def test_mixed_seed_from_memory_is_bit_identical(monkeypatch, seed):
    """The mixed kernels give the same output and gradients, bit for bit, whether the seed comes as scalars or is
    read from memory: the down kernel (h), the dx GEMM's mask and the dA reduction's."""
    ranks, rows = [3, 16, 5], 70
    x, weight, bias, As, Bs = _mixed_operands(rows, 40, 56, ranks, torch.float32, "linear", seed=5)
    ids = torch.tensor([a % 4 - 1 for a in range(rows)])
    routing = AdapterRouting(ids, len(ranks)).rows((rows,), x.device)
    grad = torch.randn(rows, 56, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    scales, ps = [0.5, 1.0, 2.0], [0.3, 0.0, 0.5]

    def run(seed_tensor):
        y = triton_backend.forward_mixed(x, weight, bias, As, Bs, scales, ps, routing, seed_tensor)
        dx, dAs, dBs = triton_backend.backward_mixed(grad, x, weight, As, Bs, scales, ps, routing, seed_tensor, True,
                                                     [True] * 3)
        return y, dx, *dAs, *dBs
    by_value, from_memory = _both_seed_places(monkeypatch, run, seed)
    for a, b in zip(by_value, from_memory, strict=True):
        assert torch.equal(a, b)
    expected = reference.forward_mixed(x.double(), weight.double(), bias.double(), [A.double() for A in As],
                                       [B.double() for B in Bs], scales, ps, routing, torch.tensor(seed))
    assert rel_err(by_value[0], expected) <= TOLERANCE[torch.float32]


def _adapters(ranks, n_in, n_out, slices, gen):
    """One trainable adapter per rank (``slices[a]``: its enabled groups of the output, stacked as the op takes)."""
    As, Bs = [], []
    for rank, groups in zip(ranks, slices, strict=True):
        enabled = sum(groups) if groups else 1
        rows = n_out // len(groups) * enabled if groups else n_out
        As.append(torch.nn.Parameter(torch.randn(rank * enabled, n_in, generator=gen).to(DEVICE)))
        Bs.append(torch.nn.Parameter(torch.randn(rows, rank, generator=gen).to(DEVICE)))
    return As, Bs


MUTATIONS = {  # writes that bump no version counter, and an in-place add that does
    "data.copy_": lambda p, new: p.data.copy_(new),
    "data =": lambda p, new: setattr(p, "data", new.clone()),
    "data.add_": lambda p, new: p.data.add_(new - p.data),
    "no_grad add_": lambda p, new: p.detach().add_(new - p.detach()),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("sliced", [False, True])
def test_mixed_batch_reads_adapters_changed_in_place(monkeypatch, mutation, sliced):
    """After an adapter's tensors change in place (through ``.data`` as loaders and weight averaging write, or
    an optimizer's in-place step), the next mixed forward uses the new values: each row equals the single-adapter
    op of its adapter, with and without slices. Nothing derived from the adapters is kept between calls."""
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    gen = torch.Generator().manual_seed(7)
    n_in, n_out, rows = 24, 48, 30
    slices = [(True, False, True), None, (False, True, False)] if sliced else [None] * 3
    As, Bs = _adapters([4, 2, 3], n_in, n_out, slices, gen)
    x = torch.randn(rows, n_in, generator=gen).to(DEVICE)
    weight, bias = torch.randn(n_out, n_in, generator=gen).to(DEVICE), torch.randn(n_out, generator=gen).to(DEVICE)
    ids = torch.tensor([a % 4 - 1 for a in range(rows)])
    scales = [0.5, 1.5, 2.0]
    with torch.no_grad():
        fastlora.lora_linear_mixed(x, weight, bias, As, Bs, scales, ids, slices=slices)
    for param in (As[0], Bs[0], As[2], Bs[1]):
        MUTATIONS[mutation](param, torch.randn(param.shape, generator=gen).to(DEVICE))
    with torch.no_grad():
        y = fastlora.lora_linear_mixed(x, weight, bias, As, Bs, scales, ids, slices=slices)
        for a in range(3):
            expected = fastlora.lora_linear(x, weight, bias, As[a], Bs[a], scales[a], slices=slices[a])
            assert rel_err(y[ids == a], expected[ids == a]) <= TOLERANCE[torch.float32], (mutation, a)
        assert rel_err(y[ids == -1], torch.nn.functional.linear(x, weight, bias)[ids == -1]) <= 1e-6


def _live_tensors() -> list[torch.Tensor]:
    """Every tensor Python holds now."""
    gc.collect()
    return [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]


def test_mixed_training_keeps_no_tensors_across_steps(monkeypatch):
    """50 optimizer-like steps on a mixed batch, each changing the adapters in place (an in-place update and a
    ``.data`` write): no tensor made after the first step is alive after the last. (Tensors other tests left for the
    collector may go meanwhile, so the check is on the new ones, not on a count.)"""
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    gen = torch.Generator().manual_seed(8)
    n_in, n_out, rows = 16, 32, 12
    As, Bs = _adapters([2, 4], n_in, n_out, [None, None], gen)
    x = torch.randn(rows, n_in, generator=gen).to(DEVICE)
    weight = torch.randn(n_out, n_in, generator=gen).to(DEVICE)
    routing = AdapterRouting(torch.tensor([a % 3 - 1 for a in range(rows)]), 2)

    def step(i):
        y = fastlora.lora_linear_mixed(x, weight, None, As, Bs, [1.0, 2.0], routing, dropout_ps=0.1, seed=i)
        y.mean().backward()
        with torch.no_grad():
            for p in (*As, *Bs):
                p.add_(p.grad, alpha=-1e-3)
                p.grad = None
        As[0].data.mul_(0.999)
    step(0)
    before = _live_tensors()  # held, so no id is reused by a new tensor
    known = {id(t) for t in before}
    for i in range(1, 50):
        step(i)
    new = [tuple(t.shape) for t in _live_tensors() if id(t) not in known]
    assert new == []


def test_float64_runs_the_reference_never_the_triton_kernels(monkeypatch):
    """float64 is no dtype of the triton backend: even where triton is the preferred backend, lora_linear and the
    mixed op on float64 tensors (forward and backward) run the reference, and forcing triton names the dtype."""
    from fastlora.ops import dispatch

    for name in ("forward", "backward", "forward_mixed", "backward_mixed"):
        monkeypatch.setattr(triton_backend, name, lambda *args: pytest.fail("float64 reached the triton backend"))
    monkeypatch.setitem(dispatch.PREFERRED, torch.device(DEVICE).type, "triton")
    monkeypatch.setattr(dispatch, "_CHOSEN", {})  # choices made before the preference changed
    gen = torch.Generator().manual_seed(9)
    x, weight, bias = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE) for shape in
                       ((6, 8), (5, 8), (5,)))
    lora_A, lora_B = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
                      for shape in ((2, 8), (5, 2)))
    y = fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 0.1, seed=3)
    y.sum().backward()
    expected, _ = reference.forward(x, weight, bias, lora_A.detach(), lora_B.detach(), 2.0, 0.1, torch.tensor(3))
    assert rel_err(y, expected) <= TOLERANCE[torch.float64] and lora_A.grad is not None
    mixed = fastlora.lora_linear_mixed(x, weight, bias, [lora_A], [lora_B], [2.0], torch.tensor([0, -1] * 3))
    mixed.sum().backward()
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="float64"):
        fastlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0)
