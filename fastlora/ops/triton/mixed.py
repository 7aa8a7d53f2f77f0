"""Mixed-adapter launchers: batches whose rows each name their own adapter (or none), over the batch's routing
(:class:`fastlora.ops.routing.Rows`: the rows sorted by adapter, so that each adapter's rows form one segment).

Forward, three launches: the adapters stacked and zero-padded to one rank (with their factor and threshold
tables), ``h = factor_a * dropout_a(x_i) @ A_a.T``, and the GEMM whose epilogue adds each row's ``h_i @ B_a.T``.
Backward: the stacks again (the same launch zeroes the gradient buffers), ``g = factor_a * dy_i @ B_a``, the dx GEMM
with ``keep * g @ A_a`` fused, h again, and dA and dB as per-adapter reductions over their segments. The stacks are
built from the adapters' tensors as they are at the call and dropped after it: nothing derived from them is kept.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch import Tensor

from fastlora.ops.reference import dropout_threshold
from fastlora.ops.routing import Rows
from fastlora.ops.triton import tuning
from fastlora.ops.triton._kernels import _mixed_down_kernel, _mixed_grad_kernel, _mixed_stack_kernel
from fastlora.ops.triton.single import NO_SEED, int32_bits, on_device, seed_args, unit_stride
from fastlora.ops.triton.tuning import INTERPRET, precision

MAX_STACKED = 32  # adapters per stacking launch (their pointers and scalars are its arguments)


class _Batch:
    """What every mixed kernel reads: the sorted ids and each sorted position's original row (int32) with each
    adapter's first position, the adapters' A's stacked ``(n, R_PAD, in)`` and B's ``(n, out, R_PAD)`` in x's
    dtype, each adapter's ``scale / (1 - p)`` (fp32) and dropout threshold (int32), the selected adapters (whose
    gradients the backward computes), and the seed's kernel arguments."""

    __slots__ = ("a_stack", "b_stack", "dropout", "factor", "ids", "order", "r_pad", "seed", "sel", "starts", "thr")

    def __init__(self, x: Tensor, out_features: int, lora_As: list[Tensor], dropout_ps: list[float], rows: Rows,
                 seed: Tensor, selected: int = 0) -> None:
        slots = max(len(lora_As), 1)  # no adapters: one that no row names
        self.r_pad = tuning.rank_pad(max((A.shape[0] for A in lora_As), default=1))
        self.ids, self.order, self.starts = rows.sorted_ids32, rows.order32, rows.starts32
        self.dropout = any(p > 0 for p in dropout_ps)
        self.seed = seed_args(seed) if self.dropout else NO_SEED
        self.a_stack = x.new_empty(slots, self.r_pad, x.shape[1])
        self.b_stack = x.new_empty(slots, out_features, self.r_pad)
        tables = torch.empty(2 * slots + selected, dtype=torch.int32, device=x.device)
        self.factor, self.thr, self.sel = tables[:slots].view(torch.float32), tables[slots:2 * slots], \
            tables[2 * slots:]

    def a_rows(self) -> tuple:
        """A's stack as the down kernel's ``(n, R_PAD, K)`` operand, and as the dx GEMM's ``(R_PAD, in)`` U."""
        return self.a_stack.stride()

    def b_as_u(self) -> tuple:
        """B's stack as the forward GEMM's ``(R_PAD, out)`` U, and as g's ``(n, R_PAD, out)`` down operand."""
        stride_a, stride_n, stride_r = self.b_stack.stride()
        return stride_a, stride_r, stride_n

    def stack(self, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float], dropout_ps: list[float],
              selected: tuple[int, ...] = (), zeroed: Tensor | None = None) -> None:
        """Fill the stacks and tables, write the ``selected`` adapters (ascending) and zero ``zeroed`` (fp32): one
        launch per MAX_STACKED adapters, none without adapters."""
        K, N = self.a_stack.shape[2], self.b_stack.shape[1]
        block = max(16, min(128, 4096 // self.r_pad))
        zero_blocks = triton.cdiv(zeroed.numel(), 1024) if zeroed is not None else 0
        programs = max(1, min(max(triton.cdiv(K, block), triton.cdiv(N, block), zero_blocks),
                              4 * tuning.sm_count(self.a_stack.device.index or 0)))
        chosen = set(selected)
        for first in range(0, len(lora_As), MAX_STACKED):
            group = range(first, min(first + MAX_STACKED, len(lora_As)))
            As, Bs = [lora_As[a] for a in group], [lora_Bs[a] for a in group]
            head = first == 0  # the first launch also zeroes
            _mixed_stack_kernel[(programs,)](
                tuple(As), tuple(Bs), tuple(A.shape[0] for A in As), tuple(s for A in As for s in A.stride()),
                tuple(s for B in Bs for s in B.stride()), tuple(scales[a] / (1.0 - dropout_ps[a]) for a in group),
                tuple(dropout_threshold(dropout_ps[a]) for a in group),
                self.a_stack, self.b_stack, self.factor, self.thr, self.sel if selected else None,
                int32_bits(sum(1 << (a - first) for a in group if a in chosen)), sum(a < first for a in selected),
                zeroed if head else None, zeroed.numel() if head and zeroed is not None else 0, K, N, first,
                R_PAD=self.r_pad, BLOCK=block, num_warps=4, num_stages=1,
            )


def _down(src: Tensor, stack: Tensor, strides: tuple, batch: _Batch, dropout: bool) -> Tensor:
    """``factor_a * dropout_a(src_i) @ stack_a.T`` as an fp32 ``(M, R_PAD)`` buffer in sorted order."""
    M, K = src.shape
    h = torch.empty(M, batch.r_pad, device=src.device, dtype=torch.float32)
    block_m, block_k = tuning.down_tile(M, batch.r_pad)
    seed = batch.seed if dropout else NO_SEED
    args = (src, stack, batch.ids, batch.order, batch.factor, batch.thr, h, seed["seed_ptr"], M, K, *src.stride(),
            *strides, seed["seed_lo"], seed["seed_hi"])
    meta = {"DROPOUT": dropout, "SEED_FROM_PTR": seed["SEED_FROM_PTR"], "R_PAD": batch.r_pad,
            "PRECISION": precision(src.dtype), "BLOCK_M": block_m, "BLOCK_K": block_k, "num_warps": 4,
            "num_stages": 2}
    grid = (triton.cdiv(M, block_m),)
    _mixed_down_kernel[grid](*args, **meta)
    tuning.compile_seed_variant(_mixed_down_kernel, grid, args, meta)
    return h


def _gemm(src: Tensor, weight: Tensor, w_strides: tuple, low_rank: Tensor, stack: Tensor, u_strides: tuple,
          bias: Tensor | None, out: Tensor, batch: _Batch, dropout: bool) -> None:
    """``out_i = src_i @ w + bias + keep_i * low_rank_i @ U_a`` for every row, written once into ``out``."""
    (M, K), N = src.shape, out.shape[1]
    if N == 0:
        return
    seed = batch.seed if dropout else NO_SEED
    args = (src, weight, low_rank, stack, batch.ids, batch.order, batch.thr, bias if bias is not None else out, out,
            seed["seed_ptr"], M, N, K, *src.stride(), *w_strides, *u_strides, *out.stride(), seed["seed_lo"],
            seed["seed_hi"])
    meta = {"HAS_BIAS": bias is not None, "DROPOUT": dropout, "SEED_FROM_PTR": seed["SEED_FROM_PTR"],
            "R_PAD": batch.r_pad, "PRECISION": precision(src.dtype)}
    family = tuning.family("mixed", M, src.dtype)
    key = ("mixed", family, N, K, bias is not None, dropout, batch.r_pad, src.dtype, weight.dtype, stack.dtype,
           src.device.index)
    tuning.launch("mixed", lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),), args,
                  meta, key, family, batch.r_pad, tuning.smem_limit(src.device.index or 0))


class _GradPlan(NamedTuple):
    """How the dA or dB reduction runs: its output's ``(P, Q)``, tile, row step, stages and row splits."""

    P: int
    Q: int
    block_p: int
    block_q: int
    block_m: int
    stages: int
    tiles: int
    rows_per_split: int
    splits: int


def _grad_plan(P: int, Q: int, dA: bool, r_pad: int, dtype: torch.dtype, selected: int, M: int,
               device_index: int) -> _GradPlan:
    """The plan of a reduction over ``selected`` adapters' rows, its splits sized for all ``M`` rows (no count is
    read back), as the single-adapter dB's."""
    side, stages = tuning.db_tile(r_pad)
    if INTERPRET:
        side = min(side, tuning.INTERPRET_CONFIG["BLOCK_M"])
    block_p, block_q = (r_pad, side) if dA else (side, r_pad)
    # fp32 dA: IEEE dots hold their operands in registers and the dropout hash its keys: 64-row steps spilled
    block_m = 16 if dA and dtype == torch.float32 and not INTERPRET else side
    tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    rows_per_split, splits = (tuning.db_splits(M, tiles * selected, side, tuning.sm_count(device_index)
                                               * tuning.DB_PROGRAMS_PER_SM) if tiles else (M, 1))
    return _GradPlan(P, Q, block_p, block_q, block_m, stages, tiles, rows_per_split, splits)


def _grad(left: Tensor, right: Tensor, dA: bool, batch: _Batch, plan: _GradPlan, out: Tensor) -> None:
    """fp32 ``out (selected, P, Q)``: per selected adapter, ``g.T @ dropout(x)`` over its rows (dA: left g, right x)
    or ``dy.T @ h`` (dB: left dy, right h), split over its rows; ``out`` zeroed where split."""
    if plan.tiles == 0 or out.shape[0] == 0:
        return
    dropout = dA and batch.dropout
    seed = batch.seed if dropout else NO_SEED
    args = (left, right, batch.starts, batch.sel, batch.order, batch.thr, out, seed["seed_ptr"], plan.P, plan.Q,
            plan.rows_per_split, *left.stride(), *right.stride(), seed["seed_lo"], seed["seed_hi"])
    meta = {"DA": dA, "DROPOUT": dropout, "SEED_FROM_PTR": seed["SEED_FROM_PTR"], "ATOMIC": plan.splits > 1,
            "PRECISION": precision(right.dtype if dA else left.dtype), "BLOCK_P": plan.block_p,
            "BLOCK_Q": plan.block_q, "BLOCK_M": plan.block_m, "num_warps": 4, "num_stages": plan.stages}
    grid = (plan.tiles, out.shape[0], plan.splits)
    _mixed_grad_kernel[grid](*args, **meta)
    tuning.compile_seed_variant(_mixed_grad_kernel, grid, args, meta)


def forward_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_As: list[Tensor], lora_Bs: list[Tensor],
                  scales: list[float], dropout_ps: list[float], rows: Rows, seed: Tensor) -> Tensor:
    """``(M, out)``, each row with its own adapter's update; see :func:`fastlora.ops.reference.forward_mixed`."""
    M, N = x.shape[0], weight.shape[0]
    out = x.new_empty(M, N)
    if M == 0:
        return out
    with on_device(x):
        batch = _Batch(x, N, lora_As, dropout_ps, rows, seed)
        batch.stack(lora_As, lora_Bs, scales, dropout_ps)
        h = _down(x, batch.a_stack, batch.a_rows(), batch, batch.dropout)
        _gemm(x, weight, (weight.stride(1), weight.stride(0)), h, batch.b_stack, batch.b_as_u(), unit_stride(bias),
              out, batch, dropout=False)
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
    wanted = tuple(a for a in range(n) if need_lora[a])
    if not (need_dx or wanted):
        return dx, dAs, dBs
    with on_device(x):
        batch = _Batch(x, N, lora_As, dropout_ps, rows, seed, len(wanted))
        zeroed = None
        if wanted:  # one fp32 buffer for dA's and dB's; its atomically accumulated parts zeroed by the stacking
            index = x.device.index or 0
            a_plan = _grad_plan(batch.r_pad, K, True, batch.r_pad, x.dtype, len(wanted), M, index)
            b_plan = _grad_plan(N, batch.r_pad, False, batch.r_pad, grad_out.dtype, len(wanted), M, index)
            a_size = len(wanted) * batch.r_pad * K
            grads = torch.empty(a_size + len(wanted) * N * batch.r_pad, device=x.device, dtype=torch.float32)
            dA, dB = grads[:a_size].view(len(wanted), batch.r_pad, K), grads[a_size:].view(len(wanted), N, batch.r_pad)
            first, last = (0 if a_plan.splits > 1 else a_size), (grads.numel() if b_plan.splits > 1 else a_size)
            zeroed = grads[first:last] if first < last else None
        batch.stack(lora_As, lora_Bs, scales, dropout_ps, wanted, zeroed)
        g = _down(grad_out, batch.b_stack, batch.b_as_u(), batch, dropout=False)  # factor_a * dy_i @ B_a
        if need_dx:
            _gemm(grad_out, weight, weight.stride(), g, batch.a_stack, batch.a_rows(), None, dx, batch,
                  dropout=batch.dropout)
        if wanted:
            h = _down(x, batch.a_stack, batch.a_rows(), batch, batch.dropout)
            _grad(g, x, True, batch, a_plan, dA)
            _grad(grad_out, h, False, batch, b_plan, dB)
            for i, a in enumerate(wanted):
                rank = lora_As[a].shape[0]
                dAs[a], dBs[a] = dA[i, :rank].to(lora_As[a].dtype), dB[i, :, :rank].to(lora_Bs[a].dtype)
    return dx, dAs, dBs
