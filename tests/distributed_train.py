"""Train a tiny GPT-2 with LoRA on every linear under FSDP2, DDP or in one process (for test_distributed.py).

Every mode trains on the same global batch, split into one micro-batch per rank; ``--mode single``
runs those micro-batches one after another in one process (gradient accumulation), each with the
RNG stream its rank would draw its dropout seeds from, so it computes what the data-parallel runs
should. Rank 0 saves the per-step losses, the full adapter weights and the fastlora backend that
ran to ``--out``; every rank prints ``final rank=R loss=L`` last. ``--device cuda`` runs on one GPU
a rank over nccl (the triton backend, unless FASTLORA_BACKEND says otherwise).

    python tests/distributed_train.py --mode single --out single.pt
    torchrun --standalone --nproc_per_node 2 tests/distributed_train.py --mode fsdp --out fsdp.pt
    torchrun --standalone --nproc_per_node 2 tests/distributed_train.py --mode ddp --device cuda --out ddp.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import fastlora
from fastlora.ops.dispatch import select

VOCAB, SEQ_LEN, SEQS_PER_RANK = 101, 16, 2
DROPOUT_SEED = 1000  # rank r draws its dropout seeds from torch's generator seeded DROPOUT_SEED + r


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("fsdp", "ddp", "single"))
    p.add_argument("--compare", nargs="+", metavar="RUN.pt",
                   help="instead of training: compare saved runs with the first (exit 1 past the tolerance)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: gloo; cuda: nccl, one GPU a rank")
    p.add_argument("--ranks", type=int, default=2, help="micro-batches of --mode single (the world size it mimics)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", help="where rank 0 saves {'losses', 'adapter', 'backend'}")
    args = p.parse_args()
    if not args.compare and not (args.mode and args.out):
        p.error("give --mode and --out, or --compare")
    return args


def compare(paths: list[str], tolerance: float = 1e-4) -> int:
    """Print each run's losses and its largest adapter difference from the first run; 1 if past ``tolerance``."""
    first, status = torch.load(paths[0]), 0
    for path in paths[1:]:
        run = torch.load(path)
        diff = max((run["adapter"][k].float() - v.float()).abs().max().item() for k, v in first["adapter"].items())
        print(f"{path}: backend {run['backend']}, losses {run['losses']}, largest adapter difference from "
              f"{paths[0]} {diff:.3g}")
        status |= diff > tolerance
    return int(status)


def tiny_lora_gpt2(device: torch.device) -> torch.nn.Module:
    """The same random tiny GPT-2 in every process, LoRA (dropout 0.1) on every linear but the head."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ_LEN, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    fastlora.inject(model, fastlora.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    return model.to(device).train()


def global_batch(ranks: int) -> torch.Tensor:
    """The token batch of every step: ``SEQS_PER_RANK`` sequences for each rank."""
    return torch.randint(0, VOCAB, (ranks * SEQS_PER_RANK, SEQ_LEN), generator=torch.Generator().manual_seed(7))


def micro_batch_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one micro-batch (every micro-batch has as many tokens)."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters, whole, on the CPU; under FSDP2 an all-gather every rank joins."""
    full = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full[name.removeprefix("module.")] = (param.full_tensor() if hasattr(param, "full_tensor")
                                                  else param).detach().cpu()
    return full


def sgd(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum on the adapter: linear in the gradients, so rounding differences stay proportional."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)


def train_single(args: argparse.Namespace, device: torch.device) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = tiny_lora_gpt2(device)
    optimizer = sgd(model, args.lr)
    chunks = global_batch(args.ranks).to(device).chunk(args.ranks)
    rng = [torch.Generator().manual_seed(DROPOUT_SEED + r).get_state() for r in range(args.ranks)]
    losses = []
    for _ in range(args.steps):
        optimizer.zero_grad()
        total = torch.zeros((), device=device)
        for r, ids in enumerate(chunks):
            torch.set_rng_state(rng[r])
            loss = micro_batch_loss(model, ids)
            (loss / args.ranks).backward()
            rng[r] = torch.get_rng_state()
            total += loss.detach()
        optimizer.step()
        losses.append(total.item() / args.ranks)
    return losses, adapter(model)


def train_parallel(args: argparse.Namespace, device: torch.device) -> tuple[list[float], dict[str, torch.Tensor]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_lora_gpt2(device)
    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = sgd(model, args.lr)
    ids = global_batch(world).to(device).chunk(world)[rank]
    torch.manual_seed(DROPOUT_SEED + rank)
    losses = []
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss = micro_batch_loss(model, ids)
        loss.backward()  # FSDP and DDP average the gradients over the ranks
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses, adapter(model)


def main() -> None:
    args = parse_args()
    if args.compare:
        sys.exit(compare(args.compare))
    torch.set_num_threads(args.threads)
    if args.mode == "single":
        device = torch.device(args.device)
        losses, weights = train_single(args, device)
        rank = 0
    else:
        rank = int(os.environ["RANK"])
        device = torch.device(args.device, int(os.environ["LOCAL_RANK"]) if args.device == "cuda" else None)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        losses, weights = train_parallel(args, device)
    if rank == 0:
        backend = select(torch.empty(0, device=device)).NAME
        torch.save({"losses": losses, "adapter": weights, "backend": backend}, args.out)
    if args.mode != "single":
        dist.destroy_process_group()
    sys.stdout.write(f"final rank={rank} loss={losses[-1]!r}\n")  # one write: ranks share torchrun's stdout
    sys.stdout.flush()
    if args.mode == "fsdp":
        # With torch 2.13 on CPU, about one FSDP2-over-gloo run in ten aborts while the interpreter shuts down
        # ("terminate called without an active exception"), after all work and the results are written, with
        # any fastlora backend: leave without running the interpreter's teardown.
        os._exit(0)


if __name__ == "__main__":
    main()
