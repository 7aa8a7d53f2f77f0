"""The triton backend: fused LoRA forward and backward on CUDA tensors (or on CPU under TRITON_INTERPRET=1).

Forward is two launches: a thin pass ``h = dropout(x) @ A.T / (1-p)`` (fp32, ``(M, R_PAD)``)
and the base GEMM whose fp32 tile also accumulates ``scale * h @ B.T`` and the bias before
being written once. Backward is up to three: the dx GEMM ``dy @ W`` that reads each dy tile
once for dx and ``g = dy @ B``, fuses ``scale * keep * (g @ A) / (1-p)`` into dx and adds dA
from the masked x tile (when dx or dA is asked for); and, for dB, the thin pass for h again
and ``scale * dy.T @ h`` over splits of the rows. The dropout mask is regenerated from the
seed in every kernel that needs it, never stored. Kernels live in
:mod:`fastlora.ops.triton._kernels` (with the rules that keep them correct on a GPU, where
the interpreter cannot tell); this module picks configs and launches. Mixed-adapter batches
(``forward_mixed`` / ``backward_mixed``) run the same plan over rows sorted by adapter, at the end.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

try:
    import triton
except ImportError as error:
    raise ImportError(f"the triton backend needs the triton package ({error})") from error

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NAME = "triton"
DEVICES = frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"})  # the interpreter runs the kernels on CPU tensors
DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
CHECKS_ARGUMENTS = False
if not INTERPRET and not torch.cuda.is_available():
    raise ImportError("the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on CPU)")

from fastlora.ops import reference  # noqa: E402
from fastlora.ops.reference import dora_backward, dora_forward, dropout_threshold, expand_slices, stack_slices  # noqa: E402, F401 (DoRA: torch ops, not fused yet)  # noqa: E402
from fastlora.ops.routing import Rows  # noqa: E402
from fastlora.ops.triton import _hopper  # noqa: E402
from fastlora.ops.triton._kernels import (  # noqa: E402
    _cast_pair_kernel,
    _lora_backward_kernel,
    _lora_db_kernel,
    _lora_down_kernel,
    _lora_forward_kernel,
    _mixed_down_kernel,
    _mixed_gemm_kernel,
    _mixed_grad_kernel,
)

# Which kernels compute the forward's GEMM and the backward's dx GEMM: today's tiled ones, or (``hopper``, not yet
# measured on a GPU, so not the default) the persistent TMA/wgmma kernels of _hopper.py wherever they apply (sm_90+,
# 16-bit, TMA-aligned operands).
GEMM_ENV_VAR = "FASTLORA_TRITON_GEMM"
GEMMS = ("tiled", "hopper")


def set_gemm(name: str) -> None:
    """Compute the forward's and dx's GEMMs with the ``tiled`` kernels or, where they apply, the ``hopper`` ones."""
    global _GEMM
    if name not in GEMMS:
        raise ValueError(f"unknown {GEMM_ENV_VAR} {name!r}: choose one of {', '.join(GEMMS)}")
    _GEMM = name


set_gemm(os.environ.get(GEMM_ENV_VAR, "tiled").strip().lower() or "tiled")

# Under the interpreter autotuning cannot run: one small fixed config (fewer programs, faster on CPU).
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
# The interpreter's stand-in for the SM count: dB of a layer with at most 64 outputs then
# splits its rows from 33 rows on, so that the tests reach both its store and atomic paths.
INTERPRET_SMS = 2
# Tile families, (rows, columns, loop step, stages, warps): the forward kernel's (BLOCK_M,
# BLOCK_N, BLOCK_K); the backward kernel's (BLOCK_M, BLOCK_K, BLOCK_N), as its output tile
# spans in-features (K) and its loop runs over out-features (N). 16-bit: wide
# wgmma tiles with 3-4 stages for Hopper (and A100's 164 KB), a 128x64 one, and a 128x128 one
# with a 32-wide step that fits the 100 KB of RTX-class cards in both directions. fp32 (IEEE dots
# run on FMA units): small tiles, which also keep compile times short. Below SMALL_M rows one
# tile, no tuning. Tiles that would not fit the GPU's shared memory are dropped;
# FALLBACK_TILE fits any GPU (101376 bytes or more) for padded ranks up to 256.
TILES = {
    "16bit": [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (128, 128, 32, 4, 8)],
    "fp32": [(64, 64, 32, 3, 4), (128, 64, 32, 3, 4)],
    "16bit-small-m": [(64, 64, 64, 4, 4)],
    "fp32-small-m": [(64, 64, 32, 3, 4)],
}
FALLBACK_TILE = (32, 32, 16, 2, 4)
SMALL_M = 1024
# Most fp32 values a thread may hold at the end of a GEMM tile (see _epilogue_values), by
# element size. 16-bit: wgmma accumulators stay clear of the 255-register limit. fp32: IEEE
# dots run as unrolled FMAs whose operands also sit in registers; past this, a rank-256 tile
# took minutes to compile for sm_90 (a 128-row backward tile: 137 s).
REGISTER_BUDGET = {2: 192, 4: 128}
# dB kernel: programs per SM to aim for when splitting the rows, and the target size in
# elements of its (BLOCK_N, R_PAD) fp32 accumulator (32 registers a thread at 4 warps).
DB_PROGRAMS_PER_SM = 2
DB_ACC_ELEMS = 4096


def _smem_bytes(tile: tuple, r_pad: int, elem: int, backward: bool) -> int:
    """Shared memory of a tile: an upper estimate of what Triton allocates, the larger of the
    software pipeline's buffers and the epilogue's (which reuse them after the loop)."""
    rows, cols, step, stages, _ = tile
    if backward:  # per stage dy (rows, step), W (step, cols), B (step, r_pad); then g (fp32), A and x tiles
        loop = stages * (rows * step + step * cols + step * r_pad) * elem
        epilogue = rows * r_pad * 4 + (r_pad * cols + cols * rows) * elem
    else:  # per stage x (rows, step), W (step, cols); then h (fp32) and B tiles
        loop = stages * (rows * step + step * cols) * elem
        epilogue = rows * r_pad * 4 + r_pad * cols * elem
    return max(loop, epilogue)


def _epilogue_values(tile: tuple, r_pad: int) -> int:
    """fp32 values a thread holds at the end of either GEMM: its share of the output tile and
    of the rank-wide tile (g in backward, h in forward)."""
    rows, cols, _, _, warps = tile
    return rows * (cols + r_pad) // (32 * warps)


def _fitting_tiles(backward: bool, family: str, r_pad: int, smem_limit: int) -> list[tuple]:
    """The family's tiles that fit ``smem_limit`` bytes and the register budget, or the fallback tile."""
    elem = 4 if family.startswith("fp32") else 2
    return [t for t in TILES[family] if _smem_bytes(t, r_pad, elem, backward) <= smem_limit
            and _epilogue_values(t, r_pad) <= REGISTER_BUDGET[elem]] or [FALLBACK_TILE]


_AUTOTUNED: dict[tuple, triton.runtime.Autotuner] = {}


def _autotuned(backward: bool, family: str, r_pad: int, smem_limit: int):
    """The kernel autotuned over the family's tiles that fit ``smem_limit`` bytes (one per argument set).

    Keyed on N, K and the constexprs that change the kernel's register use (dropout makes the
    backward's wide 16-bit tiles spill on sm_90), not on M: M changes with every batch shape
    and is covered by the family (small M or not), so a new sequence length does not re-tune.
    The backward's dA buffer is accumulated atomically: tuning zeroes it before every trial and after.
    """
    variant = (backward, family, r_pad, smem_limit)
    if variant not in _AUTOTUNED:
        configs = [triton.Config({"BLOCK_M": rows, "BLOCK_K" if backward else "BLOCK_N": cols,
                                  "BLOCK_N" if backward else "BLOCK_K": step, "GROUP_M": 8},
                                 num_stages=stages, num_warps=warps)
                   for rows, cols, step, stages, warps in _fitting_tiles(backward, family, r_pad, smem_limit)]
        kernel = _lora_backward_kernel if backward else _lora_forward_kernel
        key = ["N", "K", "NEED_DX", "NEED_DA", "DROPOUT"] if backward else ["N", "K", "HAS_BIAS"]
        _AUTOTUNED[variant] = triton.autotune(configs, key=key, reset_to_zero=["da_ptr"] if backward else None)(kernel)
    return _AUTOTUNED[variant]


def tuned_configs() -> list[dict]:
    """What autotuning has chosen in this process, one entry per kernel variant and tuning key
    (the key's values, then the dtypes of the tensor arguments): for benchmark reports."""
    chosen = []
    entries = [("backward" if backward else "forward", family, r_pad, tuned)
               for (backward, family, r_pad, _), tuned in _AUTOTUNED.items()]
    entries += [("mixed", family, r_pad, tuned) for (family, r_pad, _), tuned in _MIXED_AUTOTUNED.items()]
    for kernel, family, r_pad, tuned in entries:
        for key, config in tuned.cache.items():
            named, dtypes = key[:len(tuned.keys)], key[len(tuned.keys):]
            chosen.append({"kernel": kernel, "family": family, "r_pad": r_pad,
                           "key": dict(zip(tuned.keys, named, strict=True)), "dtypes": [str(k) for k in dtypes],
                           "tile": dict(config.kwargs), "num_warps": config.num_warps,
                           "num_stages": config.num_stages})
    return chosen


@functools.cache
def _smem_limit(device_index: int) -> int:
    """Bytes of shared memory one program may use on this GPU."""
    try:
        return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    except Exception:  # a triton without this query: torch's figure, else the smallest of current GPUs
        props = torch.cuda.get_device_properties(device_index)
        return getattr(props, "shared_memory_per_block_optin", 101376)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _family(rows: int, dtype: torch.dtype) -> str:
    return ("fp32" if dtype == torch.float32 else "16bit") + ("-small-m" if rows < SMALL_M else "")


def _rank_pad(rank: int) -> int:
    """The rank rounded up to a power of two >= 16: 16-bit dots need K >= 16 on GPUs."""
    return max(16, triton.next_power_of_2(rank))


def _precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for fp32 storage (1e-5 accuracy); 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _int32_bits(value: int) -> int:
    """A uint32 value as the int32 with the same bits (kernel scalars stay 32-bit)."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _seed_words(seed: Tensor) -> tuple[int, int]:
    """The seed's low and high 32 bits as int32 bit patterns."""
    seed_value = int(seed) & 0xFFFFFFFFFFFFFFFF
    return _int32_bits(seed_value & 0xFFFFFFFF), _int32_bits(seed_value >> 32)


_NO_DROPOUT = {"inv_keep": 1.0, "seed_ptr": None, "seed_lo": 0, "seed_hi": 0, "threshold": 0, "DROPOUT": False,
               "SEED_FROM_PTR": False}


def _dropout_args(dropout_p: float, seed: Tensor) -> dict:
    """The kernels' dropout arguments: a seed on the GPU is read by the kernels from memory (drawn on the
    device, e.g. inside a CUDA graph, where each replay draws anew; never read back to the host), a CPU
    one passed as its two 32-bit halves; the threshold and 1/(1-p)."""
    if dropout_p == 0:
        return _NO_DROPOUT
    from_ptr = seed.device.type == "cuda"
    seed_lo, seed_hi = (0, 0) if from_ptr else _seed_words(seed)
    return {"inv_keep": 1.0 / (1.0 - dropout_p), "seed_ptr": seed if from_ptr else None, "seed_lo": seed_lo,
            "seed_hi": seed_hi, "threshold": dropout_threshold(dropout_p), "DROPOUT": True, "SEED_FROM_PTR": from_ptr}


def _on_device(x: Tensor):
    """Launches go to the tensors' GPU, whichever is current (a no-op under the interpreter or when it is current)."""
    if INTERPRET or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


_CHOSEN: dict[tuple, triton.Config] = {}  # what autotuning chose, by kernel variant and tuning key


def _launch(backward: bool, tiles, args: tuple, meta: dict, key: tuple) -> None:
    """Launch on a 1-D grid of ``tiles(config)`` programs: the fixed config when interpreting; else the config
    autotuning chose for ``key`` (which holds everything the tuning key does), tuned on the first call for
    it and launched straight from the JIT afterwards (the autotuner's own per-call work skipped)."""
    kernel = _lora_backward_kernel if backward else _lora_forward_kernel
    if INTERPRET:
        kernel[(tiles(INTERPRET_CONFIG),)](*args, **meta, **INTERPRET_CONFIG)
        return
    config = _CHOSEN.get(key)
    if config is None:
        rows = args[0]  # x, or dy in backward: (M, ...) in the input dtype
        tuned = _autotuned(backward, _family(rows.shape[0], rows.dtype), meta["H_PAD"], _smem_limit(rows.device.index))
        tuned[lambda cfg: (tiles(cfg),)](*args, **meta)
        config = _CHOSEN[key] = tuned.best_config
        _compile_seed_variant(kernel, (tiles(config.kwargs),), args, {**meta, **config.all_kwargs()})
        return
    kernel[(tiles(config.kwargs),)](*args, **meta, **config.all_kwargs())


_SEED_VARIANTS: set[tuple] = set()


def _compile_seed_variant(kernel, grid: tuple, args: tuple, meta: dict) -> None:
    """Compile, without launching, the variant of a dropout kernel that reads its seed from memory, as it runs
    inside a CUDA graph (where the seed is drawn on the device): a graph captured after eager warm-up calls then
    finds it compiled (and tuned: ``_launch``'s key leaves the seed's place out), rather than compiling mid-capture."""
    if INTERPRET or not meta.get("DROPOUT") or meta.get("SEED_FROM_PTR"):
        return
    variant = (kernel.fn.__name__, *sorted((k, v) for k, v in meta.items()), *(getattr(a, "dtype", None) for a in args))
    if variant in _SEED_VARIANTS:
        return
    _SEED_VARIANTS.add(variant)
    args = list(args)
    device = next(a.device for a in args if isinstance(a, Tensor))
    args[kernel.arg_names.index("seed_ptr")] = torch.zeros((), dtype=torch.int64, device=device)
    compiled = kernel.warmup(*args, grid=grid, **{**meta, "SEED_FROM_PTR": True})
    if hasattr(compiled, "_init_handles"):  # load it onto the GPU now too: loading is no stream work to capture
        compiled._init_handles()


def _down_tile(rows: int, r_pad: int) -> tuple[int, int]:
    """The down kernel's ``(BLOCK_M, BLOCK_K)``: two pipeline stages of (x, A) tiles and the
    fp32 ``(BLOCK_M, R_PAD)`` result fit any GPU's shared memory for padded ranks up to 512."""
    block_m = 64 if rows >= 4096 and r_pad <= 128 and not INTERPRET else 32
    return block_m, 64 if r_pad <= 64 else 32 if r_pad <= 256 else 16


def _db_tile(r_pad: int) -> tuple[int, int]:
    """The dB kernel's square (BLOCK_N = BLOCK_M) tile side and pipeline stages for this padded rank.

    Its shared memory, ``stages * (side**2 + side * r_pad) * 4`` bytes at most, stays under
    72 KiB for padded ranks up to 512 (any current GPU).
    """
    return min(64, max(16, DB_ACC_ELEMS // r_pad)), 3 if r_pad <= 32 else 2


def _db_splits(M: int, column_blocks: int, side: int, programs: int) -> tuple[int, int]:
    """``(rows_per_split, splits)``: about ``programs`` programs in all, each over whole row blocks."""
    wanted = max(1, min(triton.cdiv(M, side), programs // column_blocks))
    rows_per_split = triton.cdiv(triton.cdiv(M, wanted), side) * side
    return rows_per_split, triton.cdiv(M, rows_per_split)


class _Layout:
    """How a layer's LoRA parameters map onto the kernels' rank axis: ``rs_pad`` columns for each enabled slice
    (its rank padded to a power of two >= 16, since 16-bit dots need K >= 16), ``h_pad`` in all; the output
    features in ``groups`` equal groups of ``group_rows``, enabled by the bits of ``mask`` (one group without
    slices); the dB kernel's tile, stages and row splits for ``M`` rows."""

    def __init__(self, M: int, N: int, total_rank: int, slices: tuple[bool, ...] | None, sms: int) -> None:
        self.groups = len(slices) if slices is not None else 1
        self.enabled = sum(slices) if slices is not None else 1
        self.mask = sum(1 << g for g, on in enumerate(slices) if on) if slices is not None else 1
        self.rank = total_rank // self.enabled
        self.rs_pad = max(16, triton.next_power_of_2(self.rank))
        self.h_pad = triton.next_power_of_2(self.enabled * self.rs_pad)
        self.group_rows = N // self.groups
        self.db_rows = self.group_rows * self.enabled  # B's rows, stacked
        side, self.db_stages = _db_tile(self.rs_pad)
        if INTERPRET:
            side = min(side, INTERPRET_CONFIG["BLOCK_M"])
        if slices is not None:  # a dB tile stays inside one slice
            side = min(side, self.group_rows & -self.group_rows)
        self.db_side = side
        self.db_blocks = triton.cdiv(self.db_rows, side)
        self.db_rows_per_split, self.db_splits = _db_splits(M, self.db_blocks, side, sms * DB_PROGRAMS_PER_SM)


@functools.lru_cache(maxsize=1024)
def _layout(M: int, N: int, total_rank: int, slices: tuple[bool, ...] | None, device_index: int) -> _Layout:
    return _Layout(M, N, total_rank, slices, INTERPRET_SMS if INTERPRET else _sm_count(device_index))


def _native_slices(N: int, slices: tuple[bool, ...] | None) -> bool:
    """Whether the kernels take these slices as they are: each group's rows a multiple of 16 (the dB tile's
    side); else (never the case for GPT-2's or any common model's fused projections) B is expanded densely."""
    return slices is None or (N // len(slices)) % 16 == 0


AUX_PROGRAMS = 16  # the down kernel's programs that also prepare the backward's B and zero its buffers


def _down(x: Tensor, lora_A: Tensor, lora_B: Tensor, layout: _Layout, drop: dict, bpad: Tensor | None = None,
          dA: Tensor | None = None, dB: Tensor | None = None) -> Tensor:
    """``dropout(x) @ A.T / (1 - p)`` as an fp32 ``(M, h_pad)`` buffer; the same launch fills ``bpad`` (B as the
    backward GEMM reads it) and zeroes the fp32 gradient buffers ``dA`` and ``dB`` when given."""
    (M, K), N = x.shape, lora_B.shape[0] if bpad is None else bpad.shape[0]
    h = torch.empty(M, layout.h_pad, device=x.device, dtype=torch.float32)
    block_m, block_k = _down_tile(M, layout.h_pad)
    m_blocks = triton.cdiv(M, block_m)
    aux = AUX_PROGRAMS if bpad is not None or dA is not None or dB is not None else 0
    args = (x, lora_A, h, M, K, layout.rank, *x.stride(), *lora_A.stride(),
            drop["inv_keep"], drop["seed_ptr"], drop["seed_lo"], drop["seed_hi"], drop["threshold"],
            m_blocks, lora_B, bpad, N, layout.group_rows, *lora_B.stride(),
            dA, 0 if dA is None else dA.numel(), dB, 0 if dB is None else dB.numel())
    meta = {"DROPOUT": drop["DROPOUT"], "SEED_FROM_PTR": drop["SEED_FROM_PTR"], "RS_PAD": layout.rs_pad,
            "H_PAD": layout.h_pad, "GROUPS": layout.groups, "SLICE_MASK": layout.mask, "ENABLED": layout.enabled,
            "PRECISION": _precision(x.dtype), "BLOCK_M": block_m, "BLOCK_K": block_k, "AUX_PROGRAMS": AUX_PROGRAMS,
            "num_warps": 4, "num_stages": 2}
    _lora_down_kernel[(m_blocks + aux,)](*args, **meta)
    _compile_seed_variant(_lora_down_kernel, (m_blocks + aux,), args, meta)
    return h


def _needs_bpad(lora_B: Tensor, x: Tensor, layout: _Layout) -> bool:
    """Whether B must be laid out anew for the backward GEMM (dense, contiguous ``(N, h_pad)``, in x's dtype)."""
    return not (layout.groups == 1 and lora_B.dtype == x.dtype and lora_B.shape[1] == layout.h_pad
                and lora_B.is_contiguous())


def _prepare(x: Tensor, lora_A: Tensor, lora_B: Tensor, layout: _Layout, drop: dict, N: int,
             needs: tuple[bool, bool, bool]) -> tuple:
    """``(h, bpad, dA buffer, dB buffer)`` for a backward that ``needs`` (dx, dA, dB): h from one launch that also
    lays out B and zeroes the fp32 buffers that dA (always) and dB (when split over rows) accumulate into."""
    need_dx, need_dA, need_dB = needs
    bpad = (torch.empty(N, layout.h_pad, device=x.device, dtype=x.dtype)
            if (need_dx or need_dA) and _needs_bpad(lora_B, x, layout) else None)
    dA = torch.empty(lora_A.shape, device=x.device, dtype=torch.float32) if need_dA else None
    dB = (torch.empty(lora_B.shape, device=x.device, dtype=torch.float32)
          if need_dB and layout.db_splits > 1 else None)
    return _down(x, lora_A, lora_B, layout, drop, bpad, dA, dB), bpad, dA, dB


def _gemm(x: Tensor, weight: Tensor, bias: Tensor | None, lora_B: Tensor, h: Tensor, scale: float,
          layout: _Layout) -> Tensor:
    """The forward GEMM with bias and the rank-R term in its epilogue."""
    (M, K), N = x.shape, weight.shape[0]
    out = x.new_empty(M, N)
    if _GEMM == "hopper":
        sms, smem = _hopper_limits(x)
        if _hopper.applies(x, weight, layout.h_pad, smem):
            _hopper.gemm(x, weight, bias, lora_B, h, scale, layout, out, sms, smem)
            return out
    args = (x, weight, h, lora_B, bias if bias is not None else out, out, M, N, K, layout.rank, layout.group_rows,
            *x.stride(), *weight.stride(), *lora_B.stride(), *out.stride(), scale)
    meta = {"HAS_BIAS": bias is not None, "RS_PAD": layout.rs_pad, "H_PAD": layout.h_pad, "GROUPS": layout.groups,
            "SLICE_MASK": layout.mask, "PRECISION": _precision(x.dtype)}
    key = (False, M < SMALL_M, N, K, bias is not None, layout.h_pad, layout.rs_pad, layout.mask, layout.groups,
           x.dtype, weight.dtype, lora_B.dtype, x.device.index)
    _launch(False, lambda cfg: triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), args, meta, key)
    return out


def _hopper_limits(x: Tensor) -> tuple[int, int]:
    """The SM count and shared memory per program that the persistent kernels size themselves by (interpreter: H100)."""
    return (INTERPRET_SMS, 232448) if INTERPRET else (_sm_count(x.device.index), _smem_limit(x.device.index))


def _dense(lora_B: Tensor, slices: tuple[bool, ...] | None, N: int) -> tuple[Tensor, tuple[bool, ...] | None]:
    """B and slices as the kernels take them: slices whose groups they cannot take as they are become a dense B."""
    return (lora_B, slices) if _native_slices(N, slices) else (expand_slices(lora_B, slices, N), None)


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
            dropout_p: float, seed: Tensor, slices: tuple[bool, ...] | None = None,
            needs: tuple[bool, bool, bool] | None = None) -> tuple[Tensor, tuple]:
    """``(out, saved)``: the fused LoRA linear (see :func:`fastlora.ops.reference.forward`) in two launches, and what
    :func:`backward` takes as ``saved`` for gradients ``needs`` (dx, dA, dB): h (so the backward need not read x to
    rebuild it), B laid out for the backward GEMM and the zeroed fp32 gradient buffers, all from the forward's first
    launch."""
    needs = needs or (False, False, False)
    (M, K), N = x.shape, weight.shape[0]
    if M == 0 or N == 0 or K == 0:  # nothing for the kernels to do: the reference's few ops
        return reference.forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices)
    lora_B, slices = _dense(lora_B, slices, N)
    layout = _layout(M, N, lora_A.shape[0], slices, x.device.index or 0)
    with _on_device(x):
        saved = _prepare(x, lora_A, lora_B, layout, _dropout_args(dropout_p, seed), N, needs)
        return _gemm(x, weight, bias, lora_B, saved[0], scale, layout), saved


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
             dropout_p: float, seed: Tensor, needs: tuple[bool, bool, bool],
             slices: tuple[bool, ...] | None = None, saved: tuple = ()
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)`` as asked by ``needs``, dA and dB in the LoRA parameters' own dtype and layout; see
    :func:`fastlora.ops.reference.backward`. ``saved``: what :func:`forward` prepared (else
    prepared here, one more launch). Then one launch for dx and dA, one for dB, and one more only for
    16-bit LoRA parameters (their fp32 accumulation buffers converted)."""
    need_dx, need_dA, need_dB = needs
    (M, K), N = x.shape, weight.shape[0]
    if M == 0 or N == 0 or K == 0:
        return reference.backward(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, seed, needs, slices)
    lora_B, slices_in = _dense(lora_B, slices, N)
    layout = _layout(M, N, lora_A.shape[0], slices_in, x.device.index or 0)
    drop = _dropout_args(dropout_p, seed)
    dx = dB = None
    with _on_device(x):
        h, bpad, dA_acc, dB_acc = saved or _prepare(x, lora_A, lora_B, layout, drop, N, needs)
        if need_dx or need_dA:
            dx = x.new_empty(M, K) if need_dx else None
            b = lora_B if bpad is None else bpad
            args = (grad_out, weight, lora_A, b, x, dx if need_dx else dA_acc, dA_acc if need_dA else dx,
                    drop["seed_ptr"], M, N, K, layout.rank, *grad_out.stride(), *weight.stride(), *lora_A.stride(),
                    *x.stride(), *(dx.stride() if need_dx else (0, 0)),
                    scale, drop["inv_keep"], drop["seed_lo"], drop["seed_hi"], drop["threshold"])
            meta = {"NEED_DX": need_dx, "NEED_DA": need_dA, "DROPOUT": drop["DROPOUT"],
                    "SEED_FROM_PTR": drop["SEED_FROM_PTR"], "RS_PAD": layout.rs_pad, "H_PAD": layout.h_pad,
                    "ENABLED": layout.enabled, "PRECISION": _precision(x.dtype)}
            key = (True, M < SMALL_M, N, K, need_dx, need_dA, drop["DROPOUT"], layout.h_pad, layout.rs_pad,
                   layout.enabled, x.dtype, weight.dtype, lora_A.dtype, x.device.index)
            sms, smem = _hopper_limits(x) if _GEMM == "hopper" and need_dx else (0, 0)
            if smem and _hopper.applies_dx(grad_out, weight, b, layout.h_pad, smem):
                launched = _hopper.dx(grad_out, weight, lora_A, b, x, dx, dA_acc if need_dA else None, layout, scale,
                                      drop, sms, smem)
                _compile_seed_variant(_hopper._hopper_dx_kernel, *launched)
            else:
                _launch(True, lambda cfg: triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]), args, meta,
                        key)
        if need_dB:
            dB = dB_acc if dB_acc is not None else torch.empty(lora_B.shape, device=x.device, dtype=lora_B.dtype)
            _lora_db_kernel[(layout.db_blocks, layout.db_splits)](
                grad_out, h, dB, M, layout.db_rows, layout.rank, layout.group_rows, layout.db_rows_per_split,
                *grad_out.stride(), scale, ATOMIC=dB_acc is not None, RS_PAD=layout.rs_pad, H_PAD=layout.h_pad,
                GROUPS=layout.groups, SLICE_MASK=layout.mask, PRECISION=_precision(grad_out.dtype),
                BLOCK_N=layout.db_side, BLOCK_M=layout.db_side, num_warps=4, num_stages=layout.db_stages,
            )
        dA, dB = _in_param_dtypes(dA_acc if need_dA else None, lora_A.dtype, dB, dB_acc is not None, lora_B.dtype)
    if dB is not None and slices is not None and slices_in is None:
        dB = stack_slices(dB, slices)
    return dx, dA, dB


def _in_param_dtypes(dA: Tensor | None, a_dtype: torch.dtype, dB: Tensor | None, db_accumulated: bool,
                     b_dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """dA (from its fp32 buffer) and dB (from its fp32 buffer when accumulated) in the parameters' dtypes: as
    they are for fp32 parameters, else converted, both in one launch."""
    cast_a = dA is not None and a_dtype != torch.float32
    cast_b = dB is not None and db_accumulated and b_dtype != torch.float32
    pairs = [(src, torch.empty_like(src, dtype=dtype)) for src, dtype, cast in ((dA, a_dtype, cast_a),
                                                                              (dB, b_dtype, cast_b)) if cast]
    if not pairs:
        return dA, dB
    (src1, dst1), (src2, dst2) = pairs[0], pairs[1] if len(pairs) == 2 else (pairs[0][0][:0], pairs[0][1][:0])
    block = 1024
    _cast_pair_kernel[(triton.cdiv(src1.numel(), block) + triton.cdiv(src2.numel(), block),)](
        src1, dst1, src1.numel(), src2, dst2, src2.numel(), BLOCK=block)
    converted = iter(dst for _, dst in pairs)
    return (next(converted) if cast_a else dA), (next(converted) if cast_b else dB)


# Mixed-adapter batches (see the mixed kernels in _kernels.py): the ids sorted once per call on the device,
# the adapters stacked and zero-padded to one R_PAD, two launches forward (h, then the GEMM with the
# segmented rank-R epilogue), up to five backward (g = dy @ B_a; the dx GEMM with g @ A_a fused; h again;
# dA and dB as per-adapter reductions over their segments).
_MIXED_AUTOTUNED: dict[tuple, triton.runtime.Autotuner] = {}


def _mixed_smem_bytes(tile: tuple, r_pad: int, elem: int) -> int:
    """Shared memory of a mixed GEMM tile, an upper estimate: its K loop holds the forward's two operand
    tiles, its segment loop an fp32 rank-wide tile and an adapter's tile; that loop is pipelined too, and
    its buffers may come on top of the K loop's (sm_90, padded rank 64: 16 KiB more), so the sum."""
    rows, cols, step, stages, _ = tile
    return stages * (rows * step + step * cols) * elem + rows * r_pad * 4 + r_pad * cols * elem


def _mixed_fitting_tiles(family: str, r_pad: int, smem_limit: int) -> list[tuple]:
    """The forward family's tiles that fit the mixed GEMM's shared memory and the register budget, or the fallback."""
    elem = 4 if family.startswith("fp32") else 2
    return [t for t in TILES[family] if _mixed_smem_bytes(t, r_pad, elem) <= smem_limit
            and _epilogue_values(t, r_pad) <= REGISTER_BUDGET[elem]] or [FALLBACK_TILE]


def _mixed_gemm_tuned(family: str, r_pad: int, smem_limit: int):
    """The mixed GEMM autotuned over the tiles that fit (both directions: forward and dx)."""
    variant = (family, r_pad, smem_limit)
    if variant not in _MIXED_AUTOTUNED:
        configs = [triton.Config({"BLOCK_M": rows, "BLOCK_N": cols, "BLOCK_K": step, "GROUP_M": 8},
                                 num_stages=stages, num_warps=warps)
                   for rows, cols, step, stages, warps in _mixed_fitting_tiles(family, r_pad, smem_limit)]
        _MIXED_AUTOTUNED[variant] = triton.autotune(configs, key=["N", "K", "HAS_BIAS", "DROPOUT"])(
            _mixed_gemm_kernel)
    return _MIXED_AUTOTUNED[variant]


class _MixedBatch:
    """What every mixed kernel reads: the sorted ids and each sorted position's original row (int32), the
    adapters' A's stacked ``(n, R_PAD, in)`` and B's ``(n, out, R_PAD)`` zero-padded in x's dtype, each
    adapter's ``scale / (1 - p)`` (fp32) and dropout threshold (int32), and the seed words. The stacks and
    tables are built once per set of adapters and kept until one of them changes (:func:`_adapter_stacks`)."""

    def __init__(self, x: Tensor, out_features: int, lora_As: list[Tensor], lora_Bs: list[Tensor],
                 scales: list[float], dropout_ps: list[float], rows: Rows, seed: Tensor) -> None:
        self.r_pad = _rank_pad(max((A.shape[0] for A in lora_As), default=1))
        self.ids, self.order, self.starts = rows.sorted_ids32, rows.order32, rows.starts32
        self.a_stack, self.b_stack, self.factor, self.thr = _adapter_stacks(
            x, out_features, lora_As, lora_Bs, scales, dropout_ps, self.r_pad)
        self.dropout = any(p > 0 for p in dropout_ps)
        self.seed_words = _seed_words(seed) if self.dropout else (0, 0)

    def a_rows(self) -> tuple:
        """A's stack as the down kernel's ``(n, R_PAD, K)`` operand, and as the dx GEMM's ``(R_PAD, in)`` U."""
        return self.a_stack.stride()

    def b_as_u(self) -> tuple:
        """B's stack as the forward GEMM's ``(R_PAD, out)`` U, and as g's ``(n, R_PAD, out)`` down operand."""
        stride_a, stride_n, stride_r = self.b_stack.stride()
        return stride_a, stride_r, stride_n


def _adapter_stacks(x: Tensor, out_features: int, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float],
                    dropout_ps: list[float], r_pad: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(A stack, B stack, factor, thr)`` for these adapters, reused while every A and B is the same tensor at the
    same version (an optimizer step or any in-place change bumps it): decoding with the same adapters builds them
    once, and a CUDA graph of a decode step captured after one eager call needs no host-to-device copy.
    Inference-mode parameters (no version counter) are stacked anew every call."""
    def stack():
        n = max(len(lora_As), 1)  # no adapters: one zero adapter that no row names
        a_stack = x.new_zeros(n, r_pad, x.shape[1])
        b_stack = x.new_zeros(n, out_features, r_pad)
        with torch.no_grad():
            for a, (A, B) in enumerate(zip(lora_As, lora_Bs, strict=True)):
                a_stack[a, :A.shape[0]] = A
                b_stack[a, :, :B.shape[1]] = B
        factor = torch.tensor([s / (1.0 - p) for s, p in zip(scales, dropout_ps, strict=True)] or [0.0],
                              dtype=torch.float32, device=x.device)
        thr = torch.tensor([dropout_threshold(p) for p in dropout_ps] or [0], dtype=torch.int32, device=x.device)
        return a_stack, b_stack, factor, thr
    return stack()


def _mixed_down(src: Tensor, stack: Tensor, strides: tuple, batch: _MixedBatch, dropout: bool) -> Tensor:
    """``factor_a * dropout_a(src_i) @ stack_a.T`` as an fp32 ``(M, R_PAD)`` buffer in sorted order."""
    M, K = src.shape
    h = torch.empty(M, batch.r_pad, device=src.device, dtype=torch.float32)
    block_m, block_k = _down_tile(M, batch.r_pad)
    _mixed_down_kernel[(triton.cdiv(M, block_m),)](
        src, stack, batch.ids, batch.order, batch.factor, batch.thr, h, M, K, *src.stride(), *strides,
        *batch.seed_words, DROPOUT=dropout, R_PAD=batch.r_pad, PRECISION=_precision(src.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4, num_stages=2,
    )
    return h


def _mixed_gemm(src: Tensor, weight: Tensor, w_strides: tuple, low_rank: Tensor, stack: Tensor, u_strides: tuple,
                bias: Tensor | None, out: Tensor, batch: _MixedBatch, dropout: bool) -> None:
    """``out_i = src_i @ w + bias + keep_i * low_rank_i @ U_a`` for every row, written once into ``out``."""
    (M, K), N = src.shape, out.shape[1]
    if N == 0:
        return
    args = (src, weight, low_rank, stack, batch.ids, batch.order, batch.thr, bias if bias is not None else out, out,
            M, N, K, *src.stride(), *w_strides, *u_strides, *out.stride(), *batch.seed_words)
    meta = {"HAS_BIAS": bias is not None, "DROPOUT": dropout, "R_PAD": batch.r_pad,
            "PRECISION": _precision(src.dtype)}

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    if INTERPRET:
        _mixed_gemm_kernel[grid(INTERPRET_CONFIG)](*args, **meta, **INTERPRET_CONFIG)
    else:
        tuned = _mixed_gemm_tuned(_family(M, src.dtype), batch.r_pad, _smem_limit(src.device.index))
        tuned[grid](*args, **meta)


def _mixed_grad(left: Tensor, right: Tensor, dA: bool, batch: _MixedBatch, segments: Tensor, wanted: list[int],
                most_rows: int) -> Tensor:
    """fp32 ``(len(wanted), P, Q)``: per wanted adapter, ``g.T @ dropout(x)`` over its rows (dA: left g,
    right x) or ``dy.T @ h`` (dB: left dy, right h), split over its rows like the single-adapter dB."""
    r_pad = batch.r_pad
    P, Q = (r_pad, right.shape[1]) if dA else (left.shape[1], r_pad)
    side, stages = _db_tile(r_pad)
    if INTERPRET:
        side = min(side, INTERPRET_CONFIG["BLOCK_M"])
    block_p, block_q = (r_pad, side) if dA else (side, r_pad)
    # fp32 dA: IEEE dots hold their operands in registers and the dropout hash its keys: 64-row steps spilled
    block_m = 16 if dA and right.dtype == torch.float32 and not INTERPRET else side
    tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    if tiles == 0:
        return left.new_zeros(len(wanted), P, Q, dtype=torch.float32)
    sms = INTERPRET_SMS if INTERPRET else _sm_count(left.device.index)
    rows_per_split, splits = _db_splits(most_rows, tiles * len(wanted), side, sms * DB_PROGRAMS_PER_SM)
    out = (torch.zeros if splits > 1 else torch.empty)(len(wanted), P, Q, device=left.device, dtype=torch.float32)
    selected = torch.tensor(wanted, dtype=torch.int32, device=left.device)
    _mixed_grad_kernel[(tiles, len(wanted), splits)](
        left, right, segments, selected, batch.order, batch.thr, out, P, Q, rows_per_split,
        *left.stride(), *right.stride(), *batch.seed_words,
        DA=dA, DROPOUT=dA and batch.dropout, ATOMIC=splits > 1,
        PRECISION=_precision(right.dtype if dA else left.dtype),
        BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_M=block_m, num_warps=4, num_stages=stages,
    )
    return out


def forward_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_As: list[Tensor], lora_Bs: list[Tensor],
                  scales: list[float], dropout_ps: list[float], rows: Rows, seed: Tensor) -> Tensor:
    """``(M, out)``, each row with its own adapter's update; see :func:`fastlora.ops.reference.forward_mixed`."""
    M, N = x.shape[0], weight.shape[0]
    out = x.new_empty(M, N)
    if M == 0:
        return out
    with _on_device(x):
        batch = _MixedBatch(x, N, lora_As, lora_Bs, scales, dropout_ps, rows, seed)
        h = _mixed_down(x, batch.a_stack, batch.a_rows(), batch, batch.dropout)
        _mixed_gemm(x, weight, (weight.stride(1), weight.stride(0)), h, batch.b_stack, batch.b_as_u(), bias, out,
                    batch, dropout=False)
    return out


def backward_mixed(grad_out: Tensor, x: Tensor, weight: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor],
                   scales: list[float], dropout_ps: list[float], rows: Rows, seed: Tensor,
                   need_dx: bool, need_lora: list[bool]) -> tuple[Tensor | None, list[Tensor | None],
                                                                   list[Tensor | None]]:
    """``(dx, dAs, dBs)``; see :func:`fastlora.ops.reference.backward_mixed`. Nothing is read back to the host:
    an adapter that ``need_lora`` asks for gets its gradients (zero when no row names it; the op asks only for
    adapters some row names, so that they get None, as the reference's)."""
    (M, K), N, n = x.shape, weight.shape[0], len(lora_As)
    dAs: list[Tensor | None] = [None] * n
    dBs: list[Tensor | None] = [None] * n
    dx = x.new_empty(M, K) if need_dx else None
    if M == 0:
        return dx, dAs, dBs
    wanted = [a for a in range(n) if need_lora[a]]
    if not (need_dx or wanted):
        return dx, dAs, dBs
    with _on_device(x):
        batch = _MixedBatch(x, N, lora_As, lora_Bs, scales, dropout_ps, rows, seed)
        b_stack, b_strides = batch.b_stack, batch.b_as_u()
        g = _mixed_down(grad_out, b_stack, b_strides, batch, dropout=False)  # factor_a * dy_i @ B_a
        if need_dx:
            _mixed_gemm(grad_out, weight, weight.stride(), g, batch.a_stack, batch.a_rows(), None, dx, batch,
                        dropout=batch.dropout)
        if wanted:
            h = _mixed_down(x, batch.a_stack, batch.a_rows(), batch, batch.dropout)
            segments = batch.starts
            dA = _mixed_grad(g, x, True, batch, segments, wanted, M)  # row splits sized for M: no count read back
            dB = _mixed_grad(grad_out, h, False, batch, segments, wanted, M)
            for i, a in enumerate(wanted):
                rank = lora_As[a].shape[0]
                dAs[a], dBs[a] = dA[i, :rank].to(lora_As[a].dtype), dB[i, :, :rank].to(lora_Bs[a].dtype)
    return dx, dAs, dBs
