"""A whole LoRA training step on a Hugging Face GPT-2: fastlora, peft (as is and accelerated), loralib, the floor.

    python benchmarks/bench_train_step.py --quick   # CPU: Small widths, 2 layers, 1 x 64 tokens; GPU: Small, 8 x 512
    python benchmarks/bench_train_step.py --full    # CPU: full-depth Small, 2 x 256 tokens; GPU: Medium, 8 x 1024
    python benchmarks/bench_train_step.py --smoke   # seconds: one layer, 16 tokens

The model is built from a config (random weights, no download); on a GPU the step runs under bf16 autocast. The
variants (``MODELS`` in benchmarks/contenders.py) put LoRA r=4, alpha 32, dropout 0.1 on q and v of every
``c_attn`` (peft on q, k and v: it cannot adapt part of a fused projection); the ``floor`` is the same model with
every weight frozen and no adapter, fed ``inputs_embeds`` that require grad so that backward still runs through
every layer. One step is ``zero_grad``, forward with labels, backward and ``AdamW.step``. All variants live in one
process and are timed side by side (wall time, the device synchronised). Rows (benchmark ``train_step``): ``time``
s per step with its ratio to the floor, ``throughput`` tokens/s, ``saved`` MiB (activations kept for backward over
the whole step), ``peak`` MiB on CUDA, ``trainable`` parameters.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark the checkout this file is in

import torch
from contenders import MODELS
from measure import peak_bytes, saved_storages, side_by_side
from runner import Run, arguments, table
from torch import Tensor, nn

SIZES = {"small": {"n_embd": 768, "n_layer": 12, "n_head": 12},
         "medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16}}
MIB = 2**20


@dataclass(frozen=True)
class StepCase:
    """A model size (``n_layer`` None keeps the size's depth), batch, sequence length and device."""

    size: str
    batch: int
    seq: int
    n_layer: int | None = None
    device: str = "cpu"
    autocast: str | None = None  # e.g. "bfloat16": weights stay fp32, compute runs under torch.autocast

    @property
    def label(self) -> str:
        depth = f" {self.n_layer} layers" if self.n_layer else ""
        amp = f" {self.autocast} autocast" if self.autocast else ""
        return f"gpt2-{self.size}{depth} batch={self.batch} seq={self.seq}{amp}"


SUITES = {  # name: (cases on a CPU, cases on a GPU, warm-up steps, timed rounds)
    "smoke": ([StepCase("small", 1, 16, n_layer=1)], [StepCase("small", 1, 16, n_layer=1, device="cuda")], 1, 2),
    "quick": ([StepCase("small", 1, 64, n_layer=2)], [StepCase("small", 8, 512, device="cuda", autocast="bfloat16")],
              1, 15),
    "full": ([StepCase("small", 2, 256)], [StepCase("medium", 8, 1024, device="cuda", autocast="bfloat16")], 2, 9),
}


def base_model(case: StepCase) -> nn.Module:
    """A randomly initialised GPT2LMHeadModel of the case's size (seeded: every variant starts equal)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    dims = dict(SIZES[case.size])
    if case.n_layer:
        dims["n_layer"] = case.n_layer
    torch.manual_seed(0)
    config = GPT2Config(n_positions=max(1024, case.seq), **dims)
    return GPT2LMHeadModel(config).to(case.device).train()


class Trainer:
    """A model, its optimizer (None for the floor) and one training step on fixed tokens."""

    def __init__(self, variant: str, model: nn.Module, tokens: Tensor, autocast: str | None) -> None:
        self.variant, self.model, self.tokens = variant, MODELS[variant](model), tokens
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        self.autocast = autocast

    def loss(self) -> Tensor:
        dtype = getattr(torch, self.autocast) if self.autocast else None
        with torch.autocast(self.tokens.device.type, dtype=dtype, enabled=dtype is not None):
            if self.variant == "floor":
                embeds = self.model.transformer.wte(self.tokens).detach().requires_grad_()
                return self.model(inputs_embeds=embeds, labels=self.tokens).loss
            return self.model(input_ids=self.tokens, labels=self.tokens).loss

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        if self.optimizer is not None:
            self.optimizer.step()

    def saved_bytes(self) -> int:
        """Bytes saved for backward in one step: storages other than parameters and buffers, each counted once."""
        loss, seen = saved_storages(self.loss, (*self.model.parameters(), *self.model.buffers()))
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        return sum(seen.values())


def measure_step(run: Run, case: StepCase, variants: tuple[str, ...] = tuple(MODELS), repeats: int = 5,
                 warmup: int = 2) -> list[dict]:
    """Warm up every variant, take its memory figures, time the steps side by side, record the rows."""
    base = base_model(case)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(base.config.vocab_size, (case.batch, case.seq), generator=generator).to(case.device)
    steps, trainable, saved, peak = {}, {}, {}, {}
    for variant in variants:
        try:
            trainer = Trainer(variant, copy.deepcopy(base), tokens, case.autocast)
            for _ in range(warmup):
                trainer.step()
            trainable[variant] = sum(p.numel() for p in trainer.params)
            saved[variant] = trainer.saved_bytes() / MIB
            if case.device == "cuda":
                peak[variant] = peak_bytes(trainer.step) / MIB
        except Exception as error:  # report a variant that cannot run, keep measuring the rest
            print(f"  {variant} failed on {case.label}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        steps[variant] = trainer.step
    del base
    params, first = asdict(case), len(run.rows)
    samples = side_by_side(steps, repeats, case.device, calls=1, warmup=0, events=False)
    medians = run.record_times(case.label, params, samples, baseline="floor", unit="s", device=case.device)
    run.record_group(case.label, params, "throughput", "tokens/s",
                     {name: case.batch * case.seq / seconds for name, seconds in medians.items()},
                     baseline="floor", device=case.device)
    run.record_group(case.label, params, "saved", "MiB", saved, baseline="floor", device=case.device)
    if peak:
        run.record_group(case.label, params, "peak", "MiB", peak, baseline="floor", device=case.device)
    run.record_group(case.label, params, "trainable", "parameters", trainable, device=case.device)
    return run.rows[first:]


def main(argv: list[str] | None = None) -> Run:
    argv = sys.argv[1:] if argv is None else argv
    parser = arguments(__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group()
    for name in SUITES:
        which.add_argument(f"--{name}", dest="suite", action="store_const", const=name)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(MODELS), help="comma-separated (default: all)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default per suite)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before running (default: torch's)")
    args = parser.parse_args(argv)
    cpu_cases, gpu_cases, warmup, repeats = SUITES[args.suite or "quick"]
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run("train_step", __file__, argv, args.csv)
    print(run.describe(args.device), flush=True)
    for case in gpu_cases if args.device == "cuda" else cpu_cases:
        rows = measure_step(run, case, tuple(args.variants.split(",")), args.repeats or repeats, warmup)
        print(table(rows), flush=True)
    print(f"{len(run.rows)} rows appended to {args.csv}")
    return run


if __name__ == "__main__":
    main()
