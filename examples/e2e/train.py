"""Fine-tune GPT-2 on E2E with fastlora LoRA or full fine-tuning (DDP, atomic checkpoints, exact resume).

    python examples/e2e/train.py --model gpt2-medium --data e2e --out runs/lora-m        # the paper's recipe
    torchrun --nproc_per_node 4 examples/e2e/train.py --model gpt2-medium --data e2e --out runs/lora-m
    python examples/e2e/train.py --model tiny --data synthetic --out runs/tiny           # offline, CPU

The run directory gets ``log.jsonl`` (loss, lr, tokens/s), ``checkpoints/step-N`` (adapter-only for
LoRA) with a ``checkpoints/latest`` pointer, ``final/`` (the adapter, or the full model), ``run.json``
(the measured summary that compare.py reads) and, for ``--model tiny``, ``base/`` (the tiny model).

The defaults are the LoRA paper's recipe (its examples/NLG gpt2_ft.py command for E2E; the README lists each
setting and the source line it comes from); ``--recipe bf16`` trains under bf16 autocast instead of fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import fastlora

QKV = ("q", "k", "v")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2-medium", help="gpt2 | gpt2-medium | gpt2-large | PATH | tiny")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--recipe", choices=common.RECIPES, default="paper",
                   help="paper: fp32 as the paper; bf16: the same under bf16 autocast (faster on a GPU)")
    p.add_argument("--data", default="synthetic", help="synthetic | e2e | txt | hf | a .csv/.txt file")
    p.add_argument("--data-dir", help="folder with the official CSVs (or the LoRA .txt files)")
    p.add_argument("--cache-dir", default=str(common.DEFAULT_CACHE), help="where downloaded CSVs are kept")
    p.add_argument("--split", default="train", help="which split to train on (train | dev | test)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch size (split over DDP ranks)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--adam-eps", type=float, default=1e-6)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=512, help="cut prompt + completion to their first N tokens")
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--lora-target", default="c_attn",
                   help="comma-separated module names (peft-style suffixes), or all-linear (every linear but lm_head)")
    p.add_argument("--lora-slices", default="q,v", help="parts of c_attn to adapt: e.g. q,v or q,k,v")
    p.add_argument("--dora", action="store_true", help="DoRA (weight-decomposed LoRA) instead of plain LoRA")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny-base", help="where --model tiny builds its base, or finds it built (default: OUT/base)")
    p.add_argument("--tiny-vocab", type=int, default=1024, help="BPE vocabulary size for --model tiny")
    p.add_argument("--tiny-pretrain-steps", type=int, default=300,
                   help="language-model steps on the training references that stand in for GPT-2's pretraining")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    # Tests: after step N, send this process the signal (KILL: a hard crash; TERM/INT: a polite stop).
    p.add_argument("--signal-at-step", type=int, help=argparse.SUPPRESS)
    p.add_argument("--signal", default="KILL", choices=("KILL", "TERM", "INT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    """This process's place in the (possibly single-process) job."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            torch_dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()


def setup_distributed() -> Dist:
    """Join the torchrun job if there is one (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world, device)


# ---------------------------------------------------------------------------------------------- model

def build_base(args: argparse.Namespace, dist: Dist, examples: list[common.Example]) -> tuple[str, object]:
    """The base model reference (hub name or path) and its tokenizer; builds OUT/base for ``--model tiny``."""
    if args.model != "tiny":  # a local path is recorded absolute, so that runs compare by their base
        ref = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
        return ref, common.load_tokenizer(args.model)
    base = Path(args.tiny_base or Path(args.out) / "base")
    if dist.main and not (base / "config.json").is_file():
        pretrain_tiny(args, examples, base)
    dist.barrier()
    return str(base.resolve()), common.load_tokenizer(str(base))


def pretrain_tiny(args: argparse.Namespace, examples: list[common.Example], base: Path) -> None:
    """A tiny GPT-2 with its own BPE tokenizer, language-model-trained on the training references only.

    It stands in for GPT-2's pretraining: it learns the domain's language but never sees an MR, so
    it cannot do the task before fine-tuning. Each document is all references of one MR.
    """
    groups = common.group_by_mr(examples)
    tokenizer = common.train_tokenizer([common.prompt(mr) for mr, _ in groups] + [e.ref for e in examples],
                                       args.tiny_vocab)
    model = common.tiny_model(len(tokenizer), tokenizer.eos_token_id, args.seed)
    docs = [tokenizer(" ".join(refs) + common.EOS)["input_ids"][:args.max_length] for _, refs in groups]
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    for _ in common.progress(range(args.tiny_pretrain_steps), "pretrain tiny", disable=args.no_progress):
        picks = torch.randint(len(docs), (8,), generator=generator).tolist()
        ids, mask, labels = collate([docs[i] for i in picks], [docs[i] for i in picks], tokenizer.eos_token_id)
        loss_sum, tokens = token_loss(model(input_ids=ids, attention_mask=mask).logits, labels, 0.0)
        (loss_sum / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)


def lora_config(args: argparse.Namespace) -> fastlora.LoraConfig:
    """The paper's setup by default: r=4, alpha=32, dropout 0.1 on q and v of c_attn."""
    parts = [s.strip() for s in args.lora_slices.split(",")]
    unknown = set(parts) - set(QKV)
    if unknown:
        raise SystemExit(f"--lora-slices takes q, k and v, got {sorted(unknown)}")
    slices = {"c_attn": [x in parts for x in QKV]} if set(parts) != set(QKV) else {}
    targets = fastlora.config.ALL_LINEAR if args.lora_target == "all-linear" else args.lora_target.split(",")
    return fastlora.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                               target_modules=targets, slices=slices, use_dora=args.dora)


def setup_label(args: argparse.Namespace) -> str:
    """A short name of what trains, for tables: ``full``, or the LoRA targets (c_attn's parts) and rank."""
    if args.method == "full":
        return "full"
    parts = args.lora_slices.replace(" ", "")
    targets = ",".join(f"c_attn[{parts}]" if t == "c_attn" else t for t in args.lora_target.split(","))
    if args.lora_target == "all-linear":
        targets = f"all-linear, c_attn[{parts}]"
    return f"{'DoRA' if args.dora else 'LoRA'} {targets} r={args.lora_r}"


def prepare_model(args: argparse.Namespace, base_ref: str, dist: Dist) -> torch.nn.Module:
    model = common.load_model(base_ref).to(dist.device)
    if args.method == "lora":
        fastlora.inject(model, lora_config(args))
    model.config.use_cache = False
    return model


# ----------------------------------------------------------------------------------------------- data

def collate(sequences: list[list[int]], labels: list[list[int]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        target[row, :len(lab)] = torch.tensor(lab)
    return ids, mask, target


def steps_per_epoch(n: int, batch_size: int) -> int:
    """The paper's batches per epoch: its dataset is padded up to a whole number of batches."""
    return -(-n // batch_size)


def epoch_order(n: int, batch_size: int, epoch: int, seed: int) -> list[int]:
    """Epoch ``epoch``'s example order (the same in every process and after a resume), as the paper's data loader: a
    shuffle of the examples padded up to whole batches, each padding slot a seeded random example."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    slots = steps_per_epoch(n, batch_size) * batch_size
    fill = torch.randint(n, (slots - n,), generator=generator).tolist()
    return [i if i < n else fill[i - n] for i in torch.randperm(slots, generator=generator).tolist()]


def token_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and how many there are."""
    shifted = labels[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100,
                           reduction="sum", label_smoothing=smoothing)
    return loss, (shifted != -100).sum()


def paper_schedule(warmup: int, total: int):
    """The paper's linear schedule (its optimizer.py): from 0 up to 1 over ``warmup`` steps, then down to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class PaperAdamW(torch.optim.Optimizer):
    """The paper's AdamW (examples/NLG/src/optimizer.py with --correct_bias): the bias corrections fold into the step
    size, eps is added to the uncorrected sqrt(v), and the weight decay acts after the update, on the new weights.
    torch.optim.AdamW differs in the last two: eps after the correction, decay before the update."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr {lr}, betas {betas}, eps {eps}, weight decay {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step_size = lr * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(eps), value=-step_size)
                if decay > 0:
                    p.add_(p, alpha=-lr * decay)


# ----------------------------------------------------------------------------------------- checkpoints

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_weights(model: torch.nn.Module, method: str, directory: Path) -> None:
    """The adapter alone (peft format) for LoRA, the whole model for full fine-tuning."""
    if method == "lora":
        fastlora.save_adapter(model, directory)
    else:
        model.save_pretrained(directory)


def save_checkpoint(run: Path, step: int, model, optimizer, scheduler, method: str, dist: Dist) -> None:
    """Write checkpoints/step-N atomically (temp dir + rename), then point ``latest`` at it."""
    rng = [None] * dist.world
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if dist.device.type == "cuda" else None}
    if dist.world > 1:
        torch_dist.all_gather_object(rng, state)
    else:
        rng = [state]
    if not dist.main:
        dist.barrier()
        return
    folder = run / "checkpoints"
    temp, final = folder / f".tmp-step-{step}", folder / f"step-{step}"
    shutil.rmtree(temp, ignore_errors=True)
    save_weights(unwrap(model), method, temp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng}, temp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)
    previous = latest_checkpoint(run)
    common.write_atomic(folder / "latest", final.name)
    if previous is not None and previous != final:
        shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()


def latest_checkpoint(run: Path) -> Path | None:
    pointer = run / "checkpoints" / "latest"
    return run / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def load_checkpoint(run: Path, model, optimizer, scheduler, method: str, dist: Dist) -> int:
    """Restore weights, optimizer, schedule and this rank's RNG; return the step to continue from."""
    folder = latest_checkpoint(run)
    if folder is None:
        raise SystemExit(f"--resume: no checkpoint in {run / 'checkpoints'}")
    if method == "lora":
        fastlora.load_adapter(unwrap(model), folder)
    else:
        from safetensors.torch import load_file
        unwrap(model).load_state_dict(load_file(folder / "model.safetensors", device=str(dist.device)), strict=False)
    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if dist.rank < len(state["rng"]):
        torch.set_rng_state(state["rng"][dist.rank]["cpu"])
        if dist.device.type == "cuda" and state["rng"][dist.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"][dist.rank]["cuda"])
    return state["step"]


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written by a run that died after its last checkpoint)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        common.write_atomic(path, "".join(line + "\n" for line in kept))


# ------------------------------------------------------------------------------------------- training

class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


class MemoryMeter:
    """Peak training memory beyond the model's weights.

    CUDA: ``max_memory_allocated``. CPU (where the resident set is too noisy to compare runs): counted, not
    sampled — at the largest moment of any step, the activations saved for backward (unique storages that
    are not parameters) plus the gradients and optimizer state alive at that moment.
    """

    def __init__(self, device: torch.device, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.device, self.optimizer, self.peak = device, optimizer, 0
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.kind = ("cuda max_memory_allocated" if device.type == "cuda"
                     else "cpu: saved activations + gradients + optimizer state")
        self.saved: dict[int, int] = {}

    def forward(self):
        """Context for a forward pass: counts what it saves for backward (a no-op on CUDA)."""
        self.saved = {}
        if self.device.type == "cuda":
            return contextlib.nullcontext()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.parameters:
                self.saved[storage.data_ptr()] = storage.nbytes()
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def sample(self, after_backward: bool) -> None:
        """After the forward (activations alive) or after backward / the optimizer step (gradients alive)."""
        if self.device.type == "cuda":
            return
        state = sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        grads = sum(p.grad.nbytes for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None)
        self.peak = max(self.peak, state + (grads if after_backward else sum(self.saved.values())))

    def result(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else self.peak


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = setup_distributed()
    torch.manual_seed(args.seed + dist.rank)
    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    examples = common.load_examples(args.data, args.split, args.data_dir, args.cache_dir, args.seed)
    base_ref, tokenizer = build_base(args, dist, examples)
    torch.manual_seed(args.seed + dist.rank)
    model = prepare_model(args, base_ref, dist)
    encoded = [common.encode(tokenizer, e, args.max_length) for e in examples]
    if args.batch_size % dist.world or args.batch_size < 1:
        raise SystemExit(f"--batch-size {args.batch_size} must be a positive multiple of the {dist.world} processes")
    total = args.max_steps or steps_per_epoch(len(encoded), args.batch_size) * args.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    summary = fastlora.trainable_summary(model)
    optimizer = PaperAdamW(params, lr=args.lr, betas=args.adam_betas, eps=args.adam_eps,
                           weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, paper_schedule(args.warmup_steps, total))
    start = load_checkpoint(run, model, optimizer, scheduler, args.method, dist) if args.resume else 0
    if args.resume and dist.main:
        trim_log(run / "log.jsonl", start)
    elif dist.main:  # a fresh run in an old folder starts a fresh log
        (run / "log.jsonl").unlink(missing_ok=True)
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if dist.main:
        print(f"{args.method} ({args.recipe} recipe) on {base_ref}: {summary}; {len(examples)} examples, {total} steps "
              f"from step {start}, {dist.world} process(es) on {dist.device}", flush=True)
    stats = train_loop(args, dist, model, optimizer, scheduler, encoded, tokenizer.eos_token_id, start, total)
    if stats is not None and dist.main:
        final = run / "final"
        shutil.rmtree(final, ignore_errors=True)
        save_weights(unwrap(model), args.method, final)
        if args.method == "full":
            tokenizer.save_pretrained(final)
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        stats.update(first_loss=records[0]["loss"], last_loss=records[-1]["loss"], model=args.model, base=base_ref,
                     method=args.method, recipe=args.recipe, setup=setup_label(args), final=str(final.resolve()),
                     trainable_params=summary.trainable, total_params=summary.total,
                     checkpoint_bytes=dir_bytes(final), world_size=dist.world, device=str(dist.device))
        common.write_atomic(run / "run.json", json.dumps(stats, indent=2) + "\n")
        print(f"done: loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f}; saved {final}", flush=True)
    if dist.world > 1:
        torch_dist.destroy_process_group()
    return stats or {}


def train_loop(args, dist: Dist, model, optimizer, scheduler, encoded, pad_id: int, start: int,
               total: int) -> dict | None:
    """Train from step ``start`` to ``total``; return the measured stats, or None if stopped early."""
    run, stop, log_path = Path(args.out), StopFlag(), Path(args.out) / "log.jsonl"
    per_epoch = steps_per_epoch(len(encoded), args.batch_size)
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=args.recipe == "bf16")
    memory = MemoryMeter(dist.device, model, optimizer)
    times, token_counts, order = [], [], None
    window = {"loss": 0.0, "tokens": 0, "time": 0.0, "steps": 0}
    model.train()
    bar = common.progress(total=total, initial=start, desc=f"train {args.method}",
                          disable=not dist.main or args.no_progress)
    for step in range(start, total):
        epoch, index = divmod(step, per_epoch)
        if order is None or index == 0:
            order = epoch_order(len(encoded), args.batch_size, epoch, args.seed)
        picks = order[index * args.batch_size:(index + 1) * args.batch_size][dist.rank::dist.world]
        ids, mask, labels = collate([encoded[i][0] for i in picks], [encoded[i][1] for i in picks], pad_id)
        began = time.perf_counter()
        with memory.forward():
            with autocast:
                logits = model(input_ids=ids.to(dist.device), attention_mask=mask.to(dist.device)).logits
            loss_sum, tokens = token_loss(logits, labels, args.label_smoothing)
        memory.sample(after_backward=False)
        global_tokens = dist.sum(tokens.to(dist.device).float()) + 1e-4  # as the paper's mask.sum() + 0.0001
        (loss_sum * dist.world / global_tokens).backward()
        memory.sample(after_backward=True)
        loss = (dist.sum(loss_sum.detach()) / global_tokens).item()
        if not math.isfinite(loss):
            last = latest_checkpoint(run)
            print(f"non-finite loss ({loss}) at step {step + 1}: stopping without saving; the last good "
                  f"checkpoint is {last if last else 'none (no checkpoint was written yet)'}", file=sys.stderr)
            raise SystemExit(1)
        optimizer.step()
        scheduler.step()
        memory.sample(after_backward=True)
        optimizer.zero_grad(set_to_none=True)
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        elapsed = time.perf_counter() - began
        n_tokens = int(dist.sum(mask.sum().to(dist.device)).item())
        times.append(elapsed)
        token_counts.append(n_tokens)
        for key, value in (("loss", loss), ("tokens", n_tokens), ("time", elapsed), ("steps", 1)):
            window[key] += value
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update()
        if dist.main and ((step + 1) % args.log_every == 0 or step + 1 == total):
            write_log(log_path, step + 1, epoch, window, scheduler.get_last_lr()[0])
            window = dict.fromkeys(window, 0)
        stopping = dist.sum(torch.tensor(float(stop.requested), device=dist.device)).item() > 0
        if (step + 1) % args.save_every == 0 or stopping:
            save_checkpoint(run, step + 1, model, optimizer, scheduler, args.method, dist)
        if stopping:
            if dist.main:
                print(f"\nstopped by signal after step {step + 1}: checkpoint saved; continue with --resume")
            return None
        if args.signal_at_step == step + 1:
            os.kill(os.getpid(), getattr(signal, f"SIG{args.signal}"))
    bar.close()
    timed = times[1:] or times
    return {"steps": total, "median_step_s": statistics.median(timed) if timed else float("nan"),
            "tokens_per_s": sum(token_counts[1:] or token_counts) / max(sum(timed), 1e-9),
            "peak_memory_bytes": memory.result(), "memory_kind": memory.kind}


def write_log(path: Path, step: int, epoch: int, window: dict, lr: float) -> None:
    record = {"step": step, "epoch": epoch, "loss": window["loss"] / window["steps"], "lr": lr,
              "tokens": window["tokens"], "tokens_per_s": window["tokens"] / max(window["time"], 1e-9),
              "time": time.time()}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
