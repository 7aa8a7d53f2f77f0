"""The triton backend: fused LoRA forward and backward on CUDA tensors (or on CPU under TRITON_INTERPRET=1).

Forward is two launches: a thin pass ``h = dropout(x) @ A.T`` (fp32, ``(M, R_PAD)``) and the
base GEMM whose fp32 tile also accumulates ``scale * h @ B.T`` and the bias before being
written once. Backward is two launches: a thin pass that reads ``dy`` once for ``g = dy @ B``
and dB, then ``x`` once for dA; and the dx GEMM ``dy @ W`` with ``scale * keep * (g @ A) / (1-p)``
fused in. The dropout mask is regenerated from the seed in every kernel that needs it.
Kernels live in :mod:`fastlora.ops.triton._kernels`; this module chooses configs and launches.
"""

from __future__ import annotations

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
from fastlora.ops.triton._kernels import _lora_down_kernel, _lora_gemm_kernel, _lora_grad_kernel  # noqa: E402

# Under the interpreter autotuning cannot run: one small fixed config (fewer programs, faster on CPU).
INTERPRET_GEMM_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _gemm_configs() -> list[triton.Config]:
    """Tile shapes for Hopper (wide tiles, 3-4 stages) with smaller ones that suit older cards and small M."""
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 5, 4), (128, 128, 32, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


_tuned_gemm = None if INTERPRET else triton.autotune(_gemm_configs(), key=["M", "N", "K", "R"])(_lora_gemm_kernel)


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
        "seed_lo": _int32_bits(seed_value & 0xFFFFFFFF),
        "seed_hi": _int32_bits(seed_value >> 32),
        "threshold": _int32_bits(dropout_threshold(dropout_p)),
        "inv_keep": 1.0 / (1.0 - dropout_p),
        "DROPOUT": dropout_p > 0,
    }


def _thin_block_m(rows: int) -> int:
    """Row block of the thin kernels: enough programs to fill a GPU, few atomics per output."""
    if INTERPRET:
        return 32
    return 128 if rows >= 16384 else 64 if rows >= 4096 else 32


def _lora_down(x: Tensor, lora_A: Tensor, drop: dict) -> Tensor:
    """``dropout(x) @ A.T / (1 - p)`` as an fp32 ``(M, R_PAD)`` buffer."""
    (M, K), R = x.shape, lora_A.shape[0]
    r_pad = _rank_pad(R)
    h = torch.empty(M, r_pad, device=x.device, dtype=torch.float32)
    block_m = _thin_block_m(M)
    _lora_down_kernel[(triton.cdiv(M, block_m),)](
        x, lora_A, h, M, K, R, *x.stride(), *lora_A.stride(),
        drop["inv_keep"], drop["seed_lo"], drop["seed_hi"], drop["threshold"],
        DROPOUT=drop["DROPOUT"], R_PAD=r_pad, PRECISION=_precision(x.dtype), BLOCK_M=block_m, BLOCK_K=64,
        num_warps=4,
    )
    return h


def _lora_gemm(p: Tensor, q: Tensor, low: Tensor, up: Tensor, bias: Tensor | None, scale: float,
               drop: dict, mask_output: bool) -> Tensor:
    """``p @ q + bias + scale * [keep *] (low @ up.T)`` in one kernel; every operand may be a strided view."""
    (M, K), N, R = p.shape, q.shape[1], up.shape[1]
    out = torch.empty(M, N, device=p.device, dtype=p.dtype)
    args = (p, q, low, up, bias if bias is not None else out, out, M, N, K, R,
            *p.stride(), *q.stride(), *up.stride(), *out.stride(),
            scale, drop["seed_lo"], drop["seed_hi"], drop["threshold"])
    meta = {"HAS_BIAS": bias is not None, "DROPOUT": mask_output and drop["DROPOUT"],
            "R_PAD": low.shape[1], "PRECISION": _precision(p.dtype)}
    if INTERPRET:
        cfg = INTERPRET_GEMM_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _lora_gemm_kernel[grid](*args, **meta, **cfg)
    else:
        def grid(cfg):
            return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _tuned_gemm[grid](*args, **meta)
    return out


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
            scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    """``(M, out)`` output of the fused LoRA linear; see :func:`fastlora.ops.reference.forward`."""
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0])
    drop = _dropout_args(dropout_p, seed)
    h = _lora_down(x, lora_A, drop)
    return _lora_gemm(x, weight.t(), h, lora_B, bias, scale, drop, mask_output=False)


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             scale: float, dropout_p: float, seed: Tensor,
             needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)`` as asked by ``needs``; see :func:`fastlora.ops.reference.backward`."""
    need_dx, need_dA, need_dB = needs
    (M, K), N, R = x.shape, weight.shape[0], lora_A.shape[0]
    dA = torch.zeros(R, K, device=x.device, dtype=torch.float32)
    dB = torch.zeros(N, R, device=x.device, dtype=torch.float32)
    if M == 0:
        dx = x.new_empty(0, K) if need_dx else None
        return dx, dA.to(x.dtype) if need_dA else None, dB.to(x.dtype) if need_dB else None
    drop = _dropout_args(dropout_p, seed)
    h = _lora_down(x, lora_A, drop) if need_dB else x.new_empty(0, _rank_pad(R), dtype=torch.float32)
    g = torch.empty(M, _rank_pad(R), device=x.device, dtype=torch.float32)
    block_m = _thin_block_m(M)
    _lora_grad_kernel[(triton.cdiv(M, block_m),)](
        grad_out, lora_B, h, x, g, dA, dB, M, N, K, R,
        *grad_out.stride(), *lora_B.stride(), *x.stride(),
        scale, drop["inv_keep"], drop["seed_lo"], drop["seed_hi"], drop["threshold"],
        NEED_DA=need_dA, NEED_DB=need_dB, DROPOUT=drop["DROPOUT"], R_PAD=g.shape[1],
        PRECISION=_precision(x.dtype), BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, num_warps=4,
    )
    dx = None
    if need_dx:
        dx = _lora_gemm(grad_out, weight, g, lora_A.t(), None, scale * drop["inv_keep"], drop, mask_output=True)
    return dx, dA.to(x.dtype) if need_dA else None, dB.to(x.dtype) if need_dB else None
