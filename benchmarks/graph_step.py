"""A GPT-2 training step with fastlora layers captured in a CUDA graph: replays train, and draw fresh masks.

    python benchmarks/graph_step.py [--out DIR]

GPT-2 (random weights, 4 layers of GPT-2 Medium's width), LoRA r=4 on q and v with dropout 0.1, bf16
autocast, AdamW (capturable). Checks, each printed with its numbers:

1. fwd+bwd captured with ``torch.cuda.graph`` and replayed twice on the same batch and weights: the LoRA
   gradients differ between replays (each replay draws its dropout seed on the device: relative difference
   ~0.4 on the H200), and with dropout off they agree to rounding (dA and dB are accumulated with atomic
   adds, whose order varies: ~1e-7).
2. the whole step (fwd, bwd, AdamW) captured and replayed 30 times on one batch: the loss falls.
3. the same model under ``torch.compile(mode="reduce-overhead")``: a few steps run and the loss falls.
4. time per step: eager vs graph replay (CUDA events, medians).

Needs CUDA. Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import fastlora


def _model(dropout: float):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=1024, n_head=16, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).cuda()
    fastlora.inject(model, fastlora.LoraConfig(r=4, alpha=32, dropout=dropout, target_modules=["c_attn"],
                                               slices={"c_attn": [True, False, True]}))
    fastlora.mark_only_lora_trainable(model)
    with torch.no_grad():  # a non-zero B, so that the masks reach the gradients of A
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model.train()


def _loss(model, batch):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(input_ids=batch, labels=batch).loss


def _lora_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])


def _capture(fn, warmup: int = 3):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def check_masks(dropout: float, batch) -> dict:
    model = _model(dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)

    def fwd_bwd():
        for p in params:
            p.grad.zero_()
        loss = _loss(model, batch)
        loss.backward()
        return loss

    graph, _ = _capture(fwd_bwd)
    graph.replay()
    first = _lora_grads(model).clone()
    graph.replay()
    second = _lora_grads(model).clone()
    torch.cuda.synchronize()
    difference = ((first - second).norm() / first.norm()).item()
    return {"dropout": dropout, "grads_differ": difference > 1e-3, "relative_difference": difference}


def check_training(batch, steps: int = 30) -> dict:
    model = _model(0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, capturable=True)
    static_loss = torch.zeros((), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        static_loss.copy_(loss.detach())
        return static_loss

    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    graph, _ = _capture(step)
    losses = []
    for _ in range(steps):
        graph.replay()
        losses.append(static_loss.item())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replay_ms, eager_ms = [], []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        replay_ms.append(start.elapsed_time(end))
        start.record()
        step()
        end.record()
        end.synchronize()
        eager_ms.append(start.elapsed_time(end))
    return {"first_loss": losses[0], "last_loss": losses[-1], "loss_falls": losses[-1] < losses[0] - 0.1,
            "replay_ms": statistics.median(replay_ms), "eager_ms": statistics.median(eager_ms)}


def check_compiled(batch, steps: int = 8) -> dict:
    model = _model(0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    compiled = torch.compile(model, mode="reduce-overhead")
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "loss_falls": losses[-1] < losses[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    batch = torch.randint(0, 50257, (4, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {"masks_dropout": check_masks(0.1, batch), "masks_no_dropout": check_masks(0.0, batch)}
    print(json.dumps(results), flush=True)
    results["training"] = check_training(batch)
    print(json.dumps(results["training"]), flush=True)
    try:
        results["compiled"] = check_compiled(batch)
    except Exception as error:  # reported, and a failed check
        results["compiled"] = {"error": f"{type(error).__name__}: {str(error)[:2000]}", "loss_falls": False}
    print(json.dumps(results["compiled"]), flush=True)
    ok = (results["masks_dropout"]["grads_differ"] and not results["masks_no_dropout"]["grads_differ"]
          and results["training"]["loss_falls"] and results["compiled"]["loss_falls"])
    results["ok"] = ok
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "graph_step.json").write_text(json.dumps(results, indent=1))
    print("graph step:", "OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
