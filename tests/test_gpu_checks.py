"""Checks that need a GPU (marker ``gpu``, skipped without CUDA): a GPT-2 LoRA step captured in a CUDA graph trains
and draws fresh dropout masks on every replay, and every config of the persistent (hopper) forward GEMM is right.

Their timings are benchmarks: benchmarks/bench_graph_step.py and benchmarks/bench_hopper.py, whose model, step and
reference these tests share.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_graph_step as graph_step
import bench_hopper
from contenders import Spec
from measure import capture

# fastlora's private names these checks launch directly (they move with the package: follow them here)
triton_backend = pytest.importorskip("fastlora.ops.triton", reason="triton is unavailable", exc_type=ImportError)
import triton  # noqa: E402

from fastlora.ops.triton import _hopper, single, tuning  # noqa: E402

GPU = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA device")]
needs_tma = pytest.mark.skipif(not GPU or torch.cuda.get_device_capability()[0] < 9,
                               reason="the persistent kernel needs TMA and wgmma (sm_90+)")


def _lora_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])


def _replay_difference(dropout: float) -> float:
    """fwd+bwd captured in a CUDA graph and replayed twice on the same batch and weights: the relative difference
    between the two replays' LoRA gradients."""
    model, batch = graph_step.lora_gpt2(dropout), graph_step.tokens()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)

    def fwd_bwd():
        for p in params:
            p.grad.zero_()
        loss = graph_step.loss(model, batch)
        loss.backward()
        return loss

    graph, _ = capture(fwd_bwd)
    graph.replay()
    first = _lora_grads(model).clone()
    graph.replay()
    second = _lora_grads(model).clone()
    torch.cuda.synchronize()
    return ((first - second).norm() / first.norm()).item()


def test_replays_of_a_captured_step_draw_fresh_dropout_masks():
    """Each replay draws its dropout seed on the device: with dropout the gradients differ between replays (~0.4
    relative on the H200); without, they agree to rounding (dA and dB are accumulated with atomic adds, whose
    order varies: ~1e-7)."""
    with_dropout, without = _replay_difference(0.1), _replay_difference(0.0)
    assert with_dropout > 1e-3, with_dropout
    assert without <= 1e-3, without


def test_a_captured_training_step_trains():
    """The whole step (forward, backward, capturable AdamW) captured once and replayed 30 times on one batch: the
    loss falls."""
    step, static_loss = graph_step.training_step(graph_step.lora_gpt2(0.1), graph_step.tokens())
    graph, _ = capture(step)
    losses = []
    for _ in range(30):
        graph.replay()
        losses.append(static_loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_a_reduce_overhead_compiled_model_trains():
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs by Inductor) of the model runs a few steps, and the
    loss falls."""
    model, batch = graph_step.lora_gpt2(0.1), graph_step.tokens()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    compiled = torch.compile(model, mode="reduce-overhead")
    losses = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@needs_tma
def test_every_hopper_config_matches_the_fp32_reference():
    """Each config the autotuner may pick for the persistent forward GEMM, launched directly (a config never picked
    here could be picked elsewhere), at GPT-2 Medium's c_attn shape and 1100 rows (a partial row tile; below the
    large-M bound the small-M configs), against an fp32 reference with the same dropout mask."""
    rank, p, scale = bench_hopper.RANK, bench_hopper.P, bench_hopper.ALPHA / bench_hopper.RANK
    t = bench_hopper.hopper_tensors(Spec(1100, 1024, 3072, rank, p, "bfloat16", "cuda", scale=scale))
    x, w = t["x"], t["w"]
    layout = single.layout(x.shape[0], w.shape[0], rank, None, x.device.index or 0)
    h = single.down(x, t["A"], t["B"], layout, single.dropout_args(p, t["seed"]))
    sms, smem = tuning.sm_count(x.device.index), tuning.smem_limit(x.device.index)
    configs = [c for family in ("large", "small-m") for c in tuning.configs("hopper forward", family, layout.h_pad,
                                                                            smem)]
    errors = {}
    for config in configs:
        out = x.new_empty(x.shape[0], w.shape[0])
        triton.set_allocator(single.scratch)
        grid = (min(sms, triton.cdiv(x.shape[0], config.kwargs["BLOCK_M"])
                    * triton.cdiv(w.shape[0], config.kwargs["BLOCK_N"])),)
        _hopper._hopper_forward_kernel[grid](
            x, w, h, t["B"], t["b"], out, x.shape[0], w.shape[0], x.shape[1], rank, layout.group_rows,
            x.stride(0), w.stride(0), *t["B"].stride(), out.stride(0), scale, HAS_BIAS=True, W_T=False,
            RS_PAD=layout.rs_pad, H_PAD=layout.h_pad, GROUPS=1, SLICE_MASK=1, **config.all_kwargs())
        errors[f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"] = \
            bench_hopper.reference_error(t, out)
    assert configs
    assert all(error <= 1e-2 for error in errors.values()), errors
