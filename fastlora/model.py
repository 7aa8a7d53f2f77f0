"""Model-level API: inject LoRA layers into any model, pick what trains, merge and unload."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from fastlora.config import ALL_LINEAR, LoraConfig
from fastlora.layer import LoRALinear, is_adaptable


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRALinear in ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def name_matches(name: str, targets: list[str] | str) -> bool:
    """peft's rule: a string is a regex matched against the whole name; a list holds names or suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _never_called(model: nn.Module) -> set[str]:
    """Linear modules whose forward never runs: ``nn.MultiheadAttention`` reads its ``out_proj`` weight directly."""
    return {f"{name}.out_proj" if name else "out_proj"
            for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config.target_modules`` selects, checked to be adaptable and not yet adapted.

    The model itself is never a target (it cannot be replaced in place), nor is, for ``"all-linear"``,
    a Linear whose forward the model never calls.
    """
    inside_lora = {f"{name}.{sub}" for name, layer in lora_layers(model) for sub, _ in layer.named_modules() if sub}
    never_called = _never_called(model)
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        chosen = [(n, m) for n, m in model.named_modules()
                  if n and is_adaptable(m) and m is not head and n not in inside_lora and n not in never_called]
    else:
        chosen = [(n, m) for n, m in model.named_modules()
                  if n and n not in inside_lora and name_matches(n, config.target_modules)]
    if not chosen:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}")
    for name, module in chosen:
        if isinstance(module, LoRALinear):
            raise ValueError(f"module {name!r} already has LoRA")
        if not is_adaptable(module):
            raise ValueError(f"target module {name!r} is a {type(module).__name__}; "
                             "only nn.Linear and transformers Conv1D can be adapted")
        if name in never_called:
            raise ValueError(f"target module {name!r} is the out_proj of an nn.MultiheadAttention, which reads its "
                             "weight without calling it: a LoRA update there would never apply")
    return chosen


def slices_for(name: str, config: LoraConfig) -> list[bool] | None:
    """The output groups to adapt for module ``name``, or None for the whole output."""
    for key, groups in config.slices.items():
        if name_matches(name, [key]):
            return list(groups)
    return None


def inject(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Replace every target module of ``model`` by a LoRALinear around it, in place, and freeze the rest.

    Everything is checked before the model is touched: on error the model is unchanged.
    """
    chosen = find_targets(model, config)
    for name, module in chosen:
        groups = slices_for(name, config)
        out_features = module.weight.shape[1] if not isinstance(module, nn.Linear) else module.out_features
        if groups is not None and out_features % len(groups):
            raise ValueError(f"slices {groups} for {name!r}: {len(groups)} groups do not divide "
                             f"out_features={out_features}")
    for name, module in chosen:
        layer = LoRALinear(module, r=config.r, alpha=config.alpha, dropout=config.dropout,
                           use_rslora=config.use_rslora, init=config.init, slices=slices_for(name, config))
        replace_module(model, name, layer)
    mark_only_lora_trainable(model)
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Train exactly the adapter parameters (those named ``lora_*``); freeze everything else."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.rpartition(".")[2].startswith("lora_"))


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts of a model."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """How many parameters train, out of how many."""
    params = list(model.parameters())
    return TrainableSummary(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (zero-overhead inference)."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base layers back (with the updates merged in, or dropped), giving a plain model."""
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    return model
