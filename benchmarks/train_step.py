"""End-to-end LoRA training step on a Hugging Face GPT-2: fastlora, peft (as is and accelerated), loralib, the floor.

The model is built from a config (GPT-2 Small or Medium widths, random weights, no download).
LoRA goes on q and v of every ``c_attn`` (r=4, alpha=32, dropout 0.1), the LoRA paper's setup:

- ``fastlora``: ``fastlora.inject`` with ``slices={"c_attn": [True, False, True]}``;
- ``peft``: ``peft.get_peft_model`` on ``c_attn`` with ``fan_in_fan_out=True``. peft cannot adapt
  only part of a fused projection, so it adapts q, k and v (rank 4 each, one A and one B over the
  whole 3·d output): slightly more LoRA work than the others, which is how peft users run GPT-2;
- ``peft+accelerate``: the same peft model, its LoRA layers run through fastlora by ``fastlora.accelerate``
  (no change to the model or the training code);
- ``loralib``: each ``c_attn`` replaced by ``loralib.MergedLinear(enable_lora=[True, False, True])``,
  loralib's own q,v module;
- ``floor``: the same model with every weight frozen and no adapter, fed ``inputs_embeds`` that
  require grad so that backward still runs through every layer, as LoRA training needs.

One step is ``zero_grad``, forward with labels (under ``torch.autocast`` when the case asks),
backward and ``AdamW.step`` (the floor has no parameters to step). All variants live in one
process and are timed in interleaved rounds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from harness import Timed
from timing import interleaved, time_calls
from torch import Tensor, nn

import fastlora

SIZES = {"small": {"n_embd": 768, "n_layer": 12, "n_head": 12},
         "medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16}}
RANK, ALPHA, DROPOUT = 4, 32, 0.1
QV = [True, False, True]
VARIANTS = ("floor", "fastlora", "peft", "peft+accelerate", "loralib")


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


@dataclass
class StepResult(Timed):
    """One variant on one case: step-time samples (s), tokens/s, and memory."""

    case: StepCase
    variant: str
    trainable: int = 0
    saved_bytes: int | None = None
    peak_bytes: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.case.batch * self.case.seq / self.median

    def to_dict(self) -> dict:
        return super().to_dict() | {"tokens_per_s": self.tokens_per_s}


def base_model(case: StepCase) -> nn.Module:
    """A randomly initialised GPT2LMHeadModel of the case's size (seeded: every variant starts equal)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    dims = dict(SIZES[case.size])
    if case.n_layer:
        dims["n_layer"] = case.n_layer
    torch.manual_seed(0)
    config = GPT2Config(n_positions=max(1024, case.seq), **dims)
    return GPT2LMHeadModel(config).to(case.device).train()


def _with_fastlora(model: nn.Module) -> nn.Module:
    config = fastlora.LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules=["c_attn"],
                                 slices={"c_attn": QV})
    return fastlora.inject(model, config)


def _with_peft(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["c_attn"],
                        fan_in_fan_out=True)
    return get_peft_model(model, config)


def _with_peft_accelerated(model: nn.Module) -> nn.Module:
    model = _with_peft(model)
    fastlora.accelerate(model, strict=True)
    return model


def _with_loralib(model: nn.Module) -> nn.Module:
    import loralib

    for block in model.transformer.h:
        conv = block.attn.c_attn  # transformers Conv1D: weight (in, out)
        n_in, n_out = conv.weight.shape
        layer = loralib.MergedLinear(n_in, n_out, r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, enable_lora=QV,
                                     fan_in_fan_out=True, merge_weights=False, device=conv.weight.device)
        layer.weight.data.copy_(conv.weight.data)
        layer.bias.data.copy_(conv.bias.data)
        block.attn.c_attn = layer
    loralib.mark_only_lora_as_trainable(model)
    return model


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model


ADAPT: dict[str, Callable[[nn.Module], nn.Module]] = {
    "floor": _frozen, "fastlora": _with_fastlora, "peft": _with_peft, "peft+accelerate": _with_peft_accelerated,
    "loralib": _with_loralib}


class _Trainer:
    """A model, its optimizer (None for the floor) and one training step on fixed tokens."""

    def __init__(self, variant: str, model: nn.Module, tokens: Tensor, autocast: str | None) -> None:
        self.variant, self.model, self.tokens = variant, ADAPT[variant](model), tokens
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

    def timed_step(self) -> float:
        """Wall seconds of one step, the device synchronised before and after."""
        return time_calls(self.step, 1, self.tokens.device.type, events=False)

    def saved_bytes(self) -> int:
        """Bytes saved for backward in one step: non-parameter storages, each counted once."""
        excluded = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        seen: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in excluded:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        return sum(seen.values())

    def peak_bytes(self) -> int:
        """CUDA memory at the peak of one step, above what was allocated before it."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before


def measure_step(case: StepCase, variants: tuple[str, ...] = VARIANTS, repeats: int = 5,
                 warmup: int = 2) -> list[StepResult]:
    """Time a full training step of each variant in ``repeats`` interleaved rounds after warm-up."""
    base = base_model(case)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(base.config.vocab_size, (case.batch, case.seq), generator=generator).to(case.device)
    trainers, failed = [], []
    for variant in variants:
        result = StepResult(case, variant)
        try:
            trainer = _Trainer(variant, copy.deepcopy(base), tokens, case.autocast)
            for _ in range(warmup):
                trainer.step()
            result.trainable = sum(p.numel() for p in trainer.params)
            result.saved_bytes = trainer.saved_bytes()
            if case.device == "cuda":
                result.peak_bytes = trainer.peak_bytes()
        except Exception as error:  # report a variant that cannot run, keep measuring the rest
            failed.append(StepResult(case, variant, status="error", reason=f"{type(error).__name__}: {error}"))
            continue
        trainers.append((trainer, result))
    del base
    samples = interleaved({result.variant: trainer.timed_step for trainer, result in trainers}, repeats)
    for _, result in trainers:
        result.samples = samples[result.variant]
    return [result for _, result in trainers] + failed


def overhead_over_floor(results: list[StepResult]) -> dict[str, float]:
    """Each variant's step time over the floor's, minus one (0.25 reads +25%)."""
    medians = {r.variant: r.median for r in results if r.status == "ok"}
    floor = medians.get("floor", float("nan"))
    return {name: median / floor - 1 for name, median in medians.items()}
