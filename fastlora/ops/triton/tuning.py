"""Which config runs each triton kernel variant: tile tables, shared-memory and register estimates, the thin
kernels' fixed tiles, and the one tune-once cache that every autotuned GEMM (tiled, persistent, mixed) launches
through, which also compiles each dropout variant's seed-from-memory twin ahead of any CUDA-graph capture."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from fastlora.ops.triton._hopper import _hopper_dx_kernel, _hopper_forward_kernel
from fastlora.ops.triton._kernels import _lora_backward_kernel, _lora_forward_kernel, _mixed_gemm_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Under the interpreter autotuning cannot run: one small fixed config (fewer programs, faster on CPU), and
# stand-ins for the GPU's SM count (dB of a layer with at most 64 outputs then splits its rows from 33 rows on,
# so that the tests reach both its store and atomic paths) and shared memory (an H100's).
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
HOPPER_INTERPRET_CONFIG = {**INTERPRET_CONFIG, "SUBTILES": 2}
INTERPRET_SMS = 2
INTERPRET_SMEM = 232448

# Tile families of the tiled and mixed GEMMs, (rows, columns, loop step, stages, warps): the forward's (BLOCK_M,
# BLOCK_N, BLOCK_K); the backward's (BLOCK_M, BLOCK_K, BLOCK_N), as its output tile spans in-features and its loop
# runs over out-features. 16-bit: wide wgmma tiles with 3-4 stages for Hopper (and A100's 164 KB), a 128x64 one,
# and a 128x128 one with a 32-wide step that fits the 100 KB of RTX-class cards in both directions. fp32 (IEEE
# dots run on FMA units): small tiles, which also keep compile times short. Below SMALL_M rows one tile, no
# tuning. Tiles that do not fit are dropped; FALLBACK_TILE fits any GPU (101376 bytes or more) up to padded rank 256.
TILES = {
    "16bit": [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (128, 128, 32, 4, 8)],
    "fp32": [(64, 64, 32, 3, 4), (128, 64, 32, 3, 4)],
    "16bit-small-m": [(64, 64, 64, 4, 4)],
    "fp32-small-m": [(64, 64, 32, 3, 4)],
}
# DoRA's forward writes u beside y (and scales by c): TILES' two widest tiles spilled on sm_90 (Triton 3.9).
# With dropout the GEMMs also hold a second output-sized fp32 accumulator (and the forward hashes its x tiles):
# tiles that spilled are left out, narrower ones put in.
DORA_FORWARD_TILES = {**TILES, "16bit": TILES["16bit"][2:]}
DROPPED_FORWARD_TILES = {"16bit": [(128, 64, 64, 4, 8), (64, 128, 64, 3, 8)], "16bit-small-m": [(64, 64, 64, 4, 4)],
                         "fp32": [(32, 32, 32, 3, 4)], "fp32-small-m": [(32, 32, 32, 3, 4)]}
DROPPED_BACKWARD_TILES = {"16bit": [(128, 128, 64, 4, 8), (128, 128, 32, 4, 8)], "16bit-small-m": [(64, 64, 64, 4, 4)],
                          "fp32": [(32, 32, 32, 3, 4)], "fp32-small-m": [(32, 32, 32, 3, 4)]}
FALLBACK_TILE = (32, 32, 16, 2, 4)
SMALL_M = 1024
# The persistent TMA kernels' (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, SUBTILES), after Inductor's persistent
# TMA configs; below SMALL_M rows one 64-row tile. The dx kernel's are (BLOCK_M, BLOCK_K, BLOCK_N, ...): it holds g
# and, with dropout, a second output-sized fp32 tile, so no 256-wide tiles.
HOPPER_TILES = {
    "large": [(128, 256, 64, 3, 8, 2), (256, 128, 64, 3, 8, 2), (128, 128, 64, 4, 8, 1), (128, 128, 128, 3, 4, 2),
              (128, 128, 64, 5, 4, 2)],
    "small-m": [(64, 128, 64, 4, 4, 1)],
}
HOPPER_DX_TILES = {
    "large": [(128, 128, 64, 4, 8, 2), (128, 128, 64, 3, 8, 1), (128, 64, 64, 4, 4, 1)],
    "small-m": [(64, 128, 64, 4, 4, 1)],
}
BARRIERS = 1024  # bytes of shared memory for a persistent kernel's mbarriers and alignment, above its tiles
# Most fp32 values a thread may hold at the end of a GEMM tile (register_values), by element size. 16-bit: wgmma
# accumulators stay clear of the 255-register limit. fp32: IEEE dots run as unrolled FMAs whose operands also sit
# in registers; past this, a rank-256 tile took minutes to compile for sm_90.
REGISTER_BUDGET = {2: 192, 4: 128}
# dB kernels: programs per SM to aim for when splitting the rows, and the target size in elements of the
# (BLOCK_N, R_PAD) fp32 accumulator (32 registers a thread at 4 warps).
DB_PROGRAMS_PER_SM = 2
DB_ACC_ELEMS = 4096


class Role(NamedTuple):
    """An autotuned GEMM: its kernel, tile table, the block names of a tile's (rows, columns, step), the launch
    arguments it is tuned per (besides the tensors' dtypes), the buffers tuning zeroes around each trial (atomic
    accumulation), and the config it runs under the interpreter."""

    kernel: Callable
    tiles: dict[str, list[tuple]]
    blocks: tuple[str, str, str]
    key: tuple[str, ...]
    reset: tuple[str, ...]
    interpret: dict


ROLES = {
    "forward": Role(_lora_forward_kernel, TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), ("N", "K", "HAS_BIAS"), (),
                    INTERPRET_CONFIG),
    "backward": Role(_lora_backward_kernel, TILES, ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                     ("N", "K", "NEED_DX", "NEED_DA", "DROPOUT", "DORA"), ("da_ptr",), INTERPRET_CONFIG),
    # DoRA: the same kernels with its epilogue; with dropout, holding two output-sized accumulators (base and
    # dropped-out products)
    "dora forward": Role(_lora_forward_kernel, DORA_FORWARD_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                         ("N", "K", "HAS_BIAS"), (), INTERPRET_CONFIG),
    "dropped forward": Role(_lora_forward_kernel, DROPPED_FORWARD_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                            ("N", "K", "HAS_BIAS"), (), INTERPRET_CONFIG),
    "dropped backward": Role(_lora_backward_kernel, DROPPED_BACKWARD_TILES, ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                             ("N", "K", "NEED_DA"), ("da_ptr",), INTERPRET_CONFIG),
    "mixed": Role(_mixed_gemm_kernel, TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"), ("N", "K", "HAS_BIAS", "DROPOUT"),
                  (), INTERPRET_CONFIG),
    "hopper forward": Role(_hopper_forward_kernel, HOPPER_TILES, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                           ("N", "K", "HAS_BIAS", "W_T", "RS_PAD", "H_PAD", "GROUPS", "SLICE_MASK"), (),
                           HOPPER_INTERPRET_CONFIG),
    "hopper dx": Role(_hopper_dx_kernel, HOPPER_DX_TILES, ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                      ("N", "K", "NEED_DA", "DROPOUT", "W_T", "RS_PAD", "H_PAD", "ENABLED"), ("da_ptr",),
                      HOPPER_INTERPRET_CONFIG),
}
_ELEMENT_SIZES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of a dtype the kernels take (float64 is not one: it never reaches them)."""
    size = _ELEMENT_SIZES.get(dtype)
    if size is None:
        raise TypeError(f"the triton kernels take float32, float16 or bfloat16, got {dtype}")
    return size


def family(role: str, rows: int, dtype: torch.dtype) -> str:
    """The tile family for ``rows`` rows of ``dtype``: by element size and row count (persistent: row count)."""
    small = rows < SMALL_M
    if role.startswith("hopper"):
        element_size(dtype)
        return "small-m" if small else "large"
    return ("fp32" if element_size(dtype) == 4 else "16bit") + ("-small-m" if small else "")


def precision(dtype: torch.dtype) -> str:
    """The dots' input precision: IEEE for fp32 storage (1e-5 accuracy); 16-bit inputs ignore it."""
    return "ieee" if element_size(dtype) == 4 else "tf32"


def rank_pad(rank: int) -> int:
    """The rank rounded up to a power of two >= 16: 16-bit dots need K >= 16 on GPUs."""
    return max(16, triton.next_power_of_2(rank))


def smem_bytes(role: str, tile: tuple, r_pad: int, elem: int) -> int:
    """Shared memory of a tile, an upper estimate of what Triton allocates for ``elem``-byte operands.

    Tiled: the larger of the software pipeline's buffers and the epilogue's (which reuse them after the loop).
    Mixed: their sum (its segment loop is pipelined too, and its buffers may come on top of the K loop's).
    Persistent (16-bit): the pipeline's stages, the store's buffer and the epilogue's operands all at once (the
    persistent loop may keep the ring live across the epilogue); it counts every stage, one more than Triton 3.9
    allocates.
    """
    rows, cols, step, stages, *_ = tile
    role = role.removeprefix("dropped ").removeprefix("dora ")
    if role == "forward":  # per stage x (rows, step), W (step, cols); then h (fp32) and B tiles
        return max(stages * (rows * step + step * cols) * elem, rows * r_pad * 4 + r_pad * cols * elem)
    if role == "backward":  # per stage dy (rows, step), W (step, cols), B (step, r_pad); then g (fp32), A, x tiles
        return max(stages * (rows * step + step * cols + step * r_pad) * elem,
                   rows * r_pad * 4 + (r_pad * cols + cols * rows) * elem)
    if role == "mixed":
        return stages * (rows * step + step * cols) * elem + rows * r_pad * 4 + r_pad * cols * elem
    subtiles = tile[5]
    dx = role == "hopper dx"
    loop = (rows + cols + r_pad) * step if dx else (rows + cols) * step
    return 2 * (stages * loop + rows * cols // subtiles + r_pad * (rows + cols) + (cols * rows if dx else 0)) \
        + BARRIERS


def register_values(role: str, tile: tuple, r_pad: int) -> int:
    """fp32 values a thread holds at the end of a GEMM tile: its share of the output tile and of the rank-wide tile
    (g in backward, h in forward); the persistent dx kernel also holds its masked rank-R term, DoRA's dropped
    GEMMs their second product."""
    rows, cols, _, _, warps, *_ = tile
    outputs = 2 if role in ("hopper dx", "dropped forward", "dropped backward") else 1
    return rows * (outputs * cols + r_pad) // (32 * warps)


@functools.cache
def fitting_tiles(role: str, family: str, r_pad: int, smem_limit: int) -> tuple[tuple, ...]:
    """The family's tiles that fit ``smem_limit`` bytes and the register budget; where none does, the fallback
    tile for the tiled and mixed GEMMs, nothing for the persistent ones (the tiled kernel runs instead)."""
    elem = 4 if family.startswith("fp32") else 2
    fitting = tuple(t for t in ROLES[role].tiles[family] if smem_bytes(role, t, r_pad, elem) <= smem_limit
                    and register_values(role, t, r_pad) <= REGISTER_BUDGET[elem])
    return fitting or (() if role.startswith("hopper") else (FALLBACK_TILE,))


def configs(role: str, family: str, r_pad: int, smem_limit: int) -> list[triton.Config]:
    """The autotuner's configs: the fitting tiles named as the role's kernel takes them."""
    rows_name, cols_name, step_name = ROLES[role].blocks
    return [triton.Config({rows_name: rows, cols_name: cols, step_name: step, "GROUP_M": 8,
                           **({"SUBTILES": extra[0]} if extra else {})}, num_stages=stages, num_warps=warps)
            for rows, cols, step, stages, warps, *extra in fitting_tiles(role, family, r_pad, smem_limit)]


def down_tile(rows: int, r_pad: int) -> tuple[int, int]:
    """The down kernels' ``(BLOCK_M, BLOCK_K)``: two pipeline stages of (x, A) tiles and the fp32 ``(BLOCK_M,
    R_PAD)`` result fit any GPU's shared memory for padded ranks up to 512."""
    block_m = 64 if rows >= 4096 and r_pad <= 128 and not INTERPRET else 32
    return block_m, 64 if r_pad <= 64 else 32 if r_pad <= 256 else 16


def db_tile(r_pad: int) -> tuple[int, int]:
    """The dB kernels' square (BLOCK_N = BLOCK_M) tile side and pipeline stages for this padded rank: their shared
    memory, ``stages * (side**2 + side * r_pad) * 4`` bytes at most, stays under 72 KiB up to padded rank 512."""
    return min(64, max(16, DB_ACC_ELEMS // r_pad)), 3 if r_pad <= 32 else 2


def db_splits(M: int, column_blocks: int, side: int, programs: int) -> tuple[int, int]:
    """``(rows_per_split, splits)``: about ``programs`` programs in all, each over whole row blocks."""
    wanted = max(1, min(triton.cdiv(M, side), programs // column_blocks))
    rows_per_split = triton.cdiv(triton.cdiv(M, wanted), side) * side
    return rows_per_split, triton.cdiv(M, rows_per_split)


@functools.cache
def smem_limit(device_index: int) -> int:
    """Bytes of shared memory one program may use on this GPU (the interpreter: an H100's)."""
    if INTERPRET:
        return INTERPRET_SMEM
    try:
        return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    except Exception:  # a triton without this query: torch's figure, else the smallest of current GPUs
        props = torch.cuda.get_device_properties(device_index)
        return getattr(props, "shared_memory_per_block_optin", 101376)


@functools.cache
def sm_count(device_index: int) -> int:
    """The GPU's SM count (the interpreter's stand-in: INTERPRET_SMS)."""
    return INTERPRET_SMS if INTERPRET else torch.cuda.get_device_properties(device_index).multi_processor_count


_TUNERS: dict[tuple, triton.runtime.Autotuner] = {}  # by (role, family, padded rank, shared memory)
_CHOSEN: dict[tuple, triton.Config] = {}  # by the launcher's key (see launch)


def tuner(role: str, family: str, r_pad: int, smem_limit: int) -> triton.runtime.Autotuner:
    """The role's kernel autotuned over the family's fitting tiles, one per argument set. Keyed on N, K and the
    constexprs that change the kernel's register use (dropout makes the backward's wide 16-bit tiles spill on
    sm_90), not on M: M changes with every batch shape and is covered by the family, so a new sequence length does
    not re-tune. Buffers accumulated atomically are zeroed before every trial and after."""
    variant = (role, family, r_pad, smem_limit)
    found = _TUNERS.get(variant)
    if found is None:
        spec = ROLES[role]
        found = _TUNERS[variant] = triton.autotune(configs(role, family, r_pad, smem_limit), key=list(spec.key),
                                                   reset_to_zero=list(spec.reset) or None)(spec.kernel)
    return found


def launch(role: str, grid: Callable[[dict], tuple], args: tuple, meta: dict, key: tuple, family: str, r_pad: int,
           smem: int) -> None:
    """Launch the role's kernel on ``grid(config)``: under the interpreter with its fixed config; else with the
    config tuned once for ``key`` (which holds everything the tuning key does, but never where the seed comes
    from) and launched straight from the JIT afterwards, the autotuner's per-call work skipped. The first call
    for a key also compiles the seed-from-memory variant (:func:`compile_seed_variant`)."""
    spec = ROLES[role]
    if INTERPRET:
        spec.kernel[grid(spec.interpret)](*args, **meta, **spec.interpret)
        return
    config = _CHOSEN.get(key)
    if config is None:
        tuned = tuner(role, family, r_pad, smem)
        tuned[grid](*args, **meta)
        config = _CHOSEN[key] = tuned.best_config
        compile_seed_variant(spec.kernel, grid(config.kwargs), args, {**meta, **config.all_kwargs()})
        return
    spec.kernel[grid(config.kwargs)](*args, **meta, **config.all_kwargs())


def tuned_configs() -> list[dict]:
    """What autotuning has chosen in this process, one entry per kernel role, tile family, padded rank and tuning
    key (the key's values, then the dtypes of the tensor arguments): for benchmark reports."""
    chosen = []
    for (role, family, r_pad, _), tuned in _TUNERS.items():
        for key, config in tuned.cache.items():
            named, dtypes = key[:len(tuned.keys)], key[len(tuned.keys):]
            chosen.append({"kernel": role, "family": family, "r_pad": r_pad,
                           "key": dict(zip(tuned.keys, named, strict=True)), "dtypes": [str(k) for k in dtypes],
                           "tile": dict(config.kwargs), "num_warps": config.num_warps,
                           "num_stages": config.num_stages})
    return chosen


_SEED_VARIANTS: set[tuple] = set()


def compile_seed_variant(kernel, grid: tuple, args: tuple, meta: dict) -> None:
    """Compile, without launching, the variant of a dropout kernel that reads its seed from memory, as it runs
    inside a CUDA graph (where the seed is drawn on the device): a graph captured after eager warm-up calls then
    finds it compiled (and tuned: :func:`launch`'s key leaves the seed's place out), rather than compiling
    mid-capture."""
    if INTERPRET or not meta.get("DROPOUT") or meta.get("SEED_FROM_PTR"):
        return
    variant = (kernel.fn.__name__, *meta.items(), *(getattr(a, "dtype", None) for a in args))
    if variant in _SEED_VARIANTS:
        return
    _SEED_VARIANTS.add(variant)
    args = list(args)
    device = next(a.device for a in args if isinstance(a, Tensor))
    args[kernel.arg_names.index("seed_ptr")] = torch.zeros((), dtype=torch.int64, device=device)
    compiled = kernel.warmup(*args, grid=grid, **{**meta, "SEED_FROM_PTR": True})
    if hasattr(compiled, "_init_handles"):  # load it onto the GPU now too: loading is no stream work to capture
        compiled._init_handles()
