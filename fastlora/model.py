"""Model-level API: manage a model's named adapters and mixed batches, merge, unload."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from fastlora.targets import lora_layers, replace_module
from fastlora.targets import name_matches as name_matches  # re-exported: fastlora.model was its home


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters the model's LoRA layers hold, in the order they first appear."""
    return list(dict.fromkeys(name for _, layer in lora_layers(model) for name in layer.adapters))


def _known(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise ValueError(f"{type(model).__name__} has no adapter named {name!r} (it has {adapter_names(model)})")


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter of every LoRA layer (layers without it run the base alone);
    None turns every adapter off."""
    if name is not None:
        _known(model, name)
    merged = [n for n, layer in lora_layers(model) if layer.merged_adapter not in (None, name)]
    if merged:
        raise ValueError(f"layers {merged[:3]} have another adapter merged into their base weight: unmerge first")
    for _, layer in lora_layers(model):
        layer.set_adapter(name if name in layer.adapters else None)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every LoRA layer (the layers stay, with their other adapters)."""
    _known(model, name)
    merged = [n for n, layer in lora_layers(model) if layer.merged_adapter == name]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into the base weight of {merged[:3]}: unmerge it first")
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)


@contextlib.contextmanager
def use_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch (the model input's first dim: a sequence) gets adapter
    ``names[i]``, or the base model alone for None; batches must have ``len(names)`` rows.

    Several adapters train in one batch this way: each adapter's gradients come from its own rows only.
    """
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"names must be a non-empty list of adapter names (or None), one per row, got {names!r}")
    known = set(adapter_names(model))
    unknown = sorted({n for n in names if n is not None and n not in known}, key=str)
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}: {type(model).__name__} has {sorted(known)}")
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer.merged_adapter for layer in layers if layer.merged_adapter is not None]
    if merged:
        raise ValueError(f"adapter {merged[0]!r} is merged into base weights: unmerge before using mixed batches")
    shared: dict = {}  # one ids tensor for all layers with the same adapters: the rows are routed once per batch
    for layer in layers:
        layer.set_mixed(list(names), shared)
    try:
        yield model
    finally:
        for layer in layers:
            layer.set_mixed(None)


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


def merge(model: nn.Module, exact: bool = True) -> nn.Module:
    """Fold every layer's active adapter into its base weight (zero-overhead inference).

    ``exact``: keep a copy of each merged base weight until :func:`unmerge`, which then restores the base model
    bit for bit; it costs memory equal to the adapted layers' base weights. ``exact=False`` keeps no copy, and
    unmerging is exact only to within rounding (in fp16/bf16 some base weights change).
    """
    for _, layer in lora_layers(model):
        layer.merge(exact)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (bit for bit unless it ran with ``exact=False``)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base layers back (with each layer's active adapter merged in, or every adapter dropped),
    giving a plain model. Merging here keeps no copy of the base weights (nothing is left to unmerge);
    dropping unmerges what was merged (exactly, if it was merged exactly)."""
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge(exact=False)
        else:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    return model
