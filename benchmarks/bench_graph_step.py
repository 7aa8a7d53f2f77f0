"""A GPT-2 LoRA training step captured in a CUDA graph: the replay's time per step against the eager step's.

    python benchmarks/bench_graph_step.py [--rounds 5]

GPT-2 (random weights, 4 layers of GPT-2 Medium's width, its own dropouts off), fastlora's LoRA r=4 on q and v
with dropout 0.1, bf16 autocast, AdamW (capturable), batch 4 x 256 tokens. The whole step (forward, backward,
AdamW) is captured once; replays and eager steps are timed side by side with CUDA events. Rows (benchmark
``graph_step``): ``time`` ms per step with its ratio to ``eager``. That replays train and draw fresh dropout masks,
and that ``torch.compile(mode="reduce-overhead")`` runs, are tests (tests/test_gpu_checks.py). Needs CUDA.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import torch
from contenders import gpt2_fastlora
from measure import capture, side_by_side
from runner import Run, arguments, table
from torch import Tensor, nn

BATCH, SEQ = 4, 256


def lora_gpt2(dropout: float) -> nn.Module:
    """The model on the GPU in train mode, with non-zero LoRA B (so that the masks reach the gradients of A)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=1024, n_head=16, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = gpt2_fastlora(GPT2LMHeadModel(config).cuda(), dropout)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model.train()


def tokens() -> Tensor:
    return torch.randint(0, 50257, (BATCH, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(0))


def loss(model: nn.Module, batch: Tensor) -> Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(input_ids=batch, labels=batch).loss


def training_step(model: nn.Module, batch: Tensor) -> tuple[Callable[[], Tensor], Tensor]:
    """A capturable step (gradients kept allocated, AdamW capturable) and the tensor each step copies its loss to."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, capturable=True)
    static_loss = torch.zeros((), device="cuda")

    def step() -> Tensor:
        optimizer.zero_grad(set_to_none=False)
        value = loss(model, batch)
        value.backward()
        optimizer.step()
        static_loss.copy_(value.detach())
        return static_loss

    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    return step, static_loss


def main(argv: list[str] | None = None) -> Run:
    argv = sys.argv[1:] if argv is None else argv
    parser = arguments(__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_graph_step.py needs CUDA")
    run = Run("graph_step", __file__, argv, args.csv)
    print(run.describe("cuda"), flush=True)
    step, _ = training_step(lora_gpt2(0.1), tokens())
    graph, _ = capture(step)
    samples = side_by_side({"graph replay": graph.replay, "eager": step}, args.rounds, "cuda", calls=1, warmup=2)
    params = {"n_layer": 4, "n_embd": 1024, "batch": BATCH, "seq": SEQ, "rank": 4, "dropout": 0.1,
              "autocast": "bfloat16"}
    run.record_times(f"gpt2 4x1024 batch={BATCH} seq={SEQ} q,v r=4", params, samples, baseline="eager",
                     device="cuda")
    print(table(run.rows))
    print(f"{len(run.rows)} rows appended to {args.csv}")
    return run


if __name__ == "__main__":
    main()
