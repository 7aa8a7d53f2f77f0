"""Model-level API: inject LoRA layers into any model, manage named adapters and mixed batches, merge, unload."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from fastlora.config import ALL_LINEAR, LoraConfig
from fastlora.layer import DEFAULT_ADAPTER, LoRALinear, check_adapter_name, is_adaptable


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


def find_targets(model: nn.Module, config: LoraConfig,
                 adapter_name: str = DEFAULT_ADAPTER) -> list[tuple[str, nn.Module]]:
    """The modules ``config.target_modules`` selects: adaptable ones, or LoRA layers without ``adapter_name``.

    The model itself is never a target (it cannot be replaced in place), nor is, for ``"all-linear"``,
    a Linear whose forward the model never calls.
    """
    inside_lora = {f"{name}.{sub}" for name, layer in lora_layers(model) for sub, _ in layer.named_modules() if sub}
    never_called = _never_called(model)
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        chosen = [(n, m) for n, m in model.named_modules()
                  if n and (is_adaptable(m) or isinstance(m, LoRALinear)) and m is not head
                  and (head is None or getattr(m, "base_layer", None) is not head) and n not in inside_lora
                  and n not in never_called]
    else:
        chosen = [(n, m) for n, m in model.named_modules()
                  if n and n not in inside_lora and name_matches(n, config.target_modules)]
    if not chosen:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}")
    for name, module in chosen:
        if isinstance(module, LoRALinear):
            if adapter_name in module.adapters:
                raise ValueError(f"module {name!r} already has LoRA adapter {adapter_name!r} "
                                 "(give another adapter_name to add a second adapter)")
        elif not is_adaptable(module):
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


def _out_features(module: nn.Module) -> int:
    if isinstance(module, LoRALinear):
        return module.out_features
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Add adapter ``adapter_name`` to every target module of ``model``, in place, and freeze the rest.

    A target that is a plain Linear/Conv1D is replaced by a LoRALinear around it with this adapter
    active; a target that already is a LoRALinear gets the adapter added beside its others (its active
    adapter does not change: see :func:`set_adapter`). Everything is checked before the model is
    touched: on error the model is unchanged. A transformers model's ``save_pretrained`` (and so ``Trainer``)
    then writes the base weights under their own names and the adapters in peft's format (:mod:`fastlora.hf`).
    """
    check_adapter_name(adapter_name)
    chosen = find_targets(model, config, adapter_name)
    for name, module in chosen:
        groups, out_features = slices_for(name, config), _out_features(module)
        if groups is not None and out_features % len(groups):
            raise ValueError(f"slices {groups} for {name!r}: {len(groups)} groups do not divide "
                             f"out_features={out_features}")
    settings = {"r": config.r, "alpha": config.alpha, "dropout": config.dropout, "use_rslora": config.use_rslora,
                "init": config.init}
    for name, module in chosen:
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, slices=slices_for(name, config), **settings)
        else:
            replace_module(model, name, LoRALinear(module, slices=slices_for(name, config),
                                                   adapter_name=adapter_name, **settings))
    mark_only_lora_trainable(model)
    from fastlora.hf import attach  # a transformers model's save_pretrained writes base and adapters loadably
    attach(model)
    return model


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
