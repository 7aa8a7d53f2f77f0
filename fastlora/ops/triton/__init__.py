"""The triton backend: fused LoRA forward and backward on CUDA tensors (or on CPU under TRITON_INTERPRET=1).

Forward is two launches: a thin pass ``h = dropout(x) @ A.T / (1-p)`` (fp32, ``(M, R_PAD)``)
and the base GEMM whose fp32 tile also accumulates ``scale * h @ B.T`` and the bias before
being written once. Backward is two launches too: the same thin pass (for dB, when asked),
and the dx GEMM ``dy @ W`` that reads each dy tile once for dx, ``g = dy @ B`` and dB's share,
fuses ``scale * keep * (g @ A) / (1-p)`` into dx and adds dA from the masked x tile. The
dropout mask is regenerated from the seed in every kernel that needs it, never stored.
Kernels live in :mod:`fastlora.ops.triton._kernels`; this module picks configs and launches.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

try:
    import triton
except ImportError as error:
    raise ImportError(f"the triton backend needs the triton package ({error})") from error

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    raise ImportError("the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on CPU)")

from fastlora.ops.reference import dropout_threshold  # noqa: E402
from fastlora.ops.triton._kernels import _lora_backward_kernel, _lora_down_kernel, _lora_forward_kernel  # noqa: E402

# Under the interpreter autotuning cannot run: one small fixed config (fewer programs, faster on CPU).
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
# Tile families, (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); the backward kernel's tile is
# (BLOCK_M, BLOCK_K) and it loops over N in BLOCK_N steps. 16-bit: wide wgmma tiles with 3-4
# stages for Hopper plus narrower ones for older cards. fp32 (IEEE dots run on FMA units):
# small tiles, which also keep compile times short. Below SMALL_M rows one tile, no tuning.
TILES = {
    "16bit": [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
              (128, 64, 64, 4, 4)],
    "fp32": [(64, 64, 32, 3, 4), (128, 64, 32, 3, 4)],
    "16bit-small-m": [(64, 64, 64, 4, 4)],
    "fp32-small-m": [(64, 64, 32, 3, 4)],
}
SMALL_M = 1024


def _zero_grad_buffers(args: dict) -> None:
    """Before every (also every autotuning) launch: the atomically accumulated dA and dB start at zero."""
    args["da_ptr"].zero_()
    args["db_ptr"].zero_()


def _configs(family: str, backward: bool) -> list[triton.Config]:
    hook = _zero_grad_buffers if backward else None
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bk if backward else bn, "BLOCK_K": bn if backward else bk,
                           "GROUP_M": 8}, num_stages=stages, num_warps=warps, pre_hook=hook)
            for bm, bn, bk, stages, warps in TILES[family]]


def _autotuned(kernel, backward: bool) -> dict:
    """One autotuner per tile family (none under the interpreter)."""
    if INTERPRET:
        return {}
    return {family: triton.autotune(_configs(family, backward), key=["M", "N", "K"])(kernel) for family in TILES}


_tuned_forward = _autotuned(_lora_forward_kernel, backward=False)
_tuned_backward = _autotuned(_lora_backward_kernel, backward=True)


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


def _dropout_args(dropout_p: float, seed: Tensor) -> dict:
    """The kernels' dropout scalars: the seed's 32-bit halves, the threshold and 1/(1-p)."""
    seed_value = int(seed) & 0xFFFFFFFFFFFFFFFF
    return {
        "inv_keep": 1.0 / (1.0 - dropout_p),
        "seed_lo": _int32_bits(seed_value & 0xFFFFFFFF),
        "seed_hi": _int32_bits(seed_value >> 32),
        "threshold": dropout_threshold(dropout_p),
        "DROPOUT": dropout_p > 0,
    }


def _launch(tuned: dict, kernel, family: str, tiles, args: tuple, meta: dict) -> None:
    """Launch on a 1-D grid of ``tiles(config)`` programs: autotuned, or the fixed config when interpreting."""
    if INTERPRET:
        kernel[(tiles(INTERPRET_CONFIG),)](*args, **meta, **INTERPRET_CONFIG)
    else:
        with torch.cuda.device(args[0].device):  # the tensors' GPU, whichever is current
            tuned[family][lambda cfg: (tiles(cfg),)](*args, **meta)


def _lora_down(x: Tensor, lora_A: Tensor, drop: dict) -> Tensor:
    """``dropout(x) @ A.T / (1 - p)`` as an fp32 ``(M, R_PAD)`` buffer."""
    (M, K), R = x.shape, lora_A.shape[0]
    r_pad = _rank_pad(R)
    h = torch.empty(M, r_pad, device=x.device, dtype=torch.float32)
    block_m = 32 if INTERPRET or M < 4096 else 64
    with contextlib.nullcontext() if INTERPRET else torch.cuda.device(x.device):
        _lora_down_kernel[(triton.cdiv(M, block_m),)](
            x, lora_A, h, M, K, R, *x.stride(), *lora_A.stride(),
            drop["inv_keep"], drop["seed_lo"], drop["seed_hi"], drop["threshold"],
            DROPOUT=drop["DROPOUT"], R_PAD=r_pad, PRECISION=_precision(x.dtype), BLOCK_M=block_m, BLOCK_K=64,
            num_warps=4,
        )
    return h


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
            scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    """``(M, out)`` output of the fused LoRA linear; see :func:`fastlora.ops.reference.forward`."""
    (M, K), N, R = x.shape, weight.shape[0], lora_A.shape[0]
    out = x.new_empty(M, N)
    if M == 0:
        return out
    h = _lora_down(x, lora_A, _dropout_args(dropout_p, seed))
    args = (x, weight, h, lora_B, bias if bias is not None else out, out, M, N, K, R,
            *x.stride(), *weight.stride(), *lora_B.stride(), *out.stride(), scale)
    meta = {"HAS_BIAS": bias is not None, "R_PAD": h.shape[1], "PRECISION": _precision(x.dtype)}
    _launch(_tuned_forward, _lora_forward_kernel, _family(M, x.dtype),
            lambda cfg: triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), args, meta)
    return out


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             scale: float, dropout_p: float, seed: Tensor,
             needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)`` as asked by ``needs``; see :func:`fastlora.ops.reference.backward`."""
    need_dx, need_dA, need_dB = needs
    (M, K), N, R = x.shape, weight.shape[0], lora_A.shape[0]
    dx = x.new_empty(M, K) if need_dx else None
    dA = torch.zeros(R, K, device=x.device, dtype=torch.float32)
    dB = torch.zeros(N, R, device=x.device, dtype=torch.float32)
    if M > 0 and any(needs):
        drop = _dropout_args(dropout_p, seed)
        h = _lora_down(x, lora_A, drop) if need_dB else dB  # dB: a placeholder the kernel never reads
        args = (grad_out, weight, lora_A, lora_B, x, h, dx if need_dx else dA, dA, dB, M, N, K, R,
                *grad_out.stride(), *weight.stride(), *lora_A.stride(), *lora_B.stride(), *x.stride(),
                *(dx.stride() if need_dx else (0, 0)),
                scale, drop["inv_keep"], drop["seed_lo"], drop["seed_hi"], drop["threshold"])
        meta = {"NEED_DX": need_dx, "NEED_DA": need_dA, "NEED_DB": need_dB, "DROPOUT": drop["DROPOUT"],
                "R_PAD": _rank_pad(R), "PRECISION": _precision(x.dtype)}
        _launch(_tuned_backward, _lora_backward_kernel, _family(M, x.dtype),
                lambda cfg: triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]), args, meta)
    return dx, dA.to(x.dtype) if need_dA else None, dB.to(x.dtype) if need_dB else None
