"""Where LoRA layers go: peft's target-module matching, and LoRA layers put in the targets' place."""

from __future__ import annotations

import re
from collections.abc import Iterator

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


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def inject_layers(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """The layers of :func:`fastlora.inject`: adapter ``adapter_name`` at every target module, all checked first.

    A target that is a plain Linear/Conv1D is replaced by a LoRALinear around it with this adapter active; a
    target that already is a LoRALinear gets the adapter added beside its others.
    """
    check_adapter_name(adapter_name)
    chosen = find_targets(model, config, adapter_name)
    for name, module in chosen:
        groups, out_features = slices_for(name, config), _out_features(module)
        if groups is not None and out_features % len(groups):
            raise ValueError(f"slices {groups} for {name!r}: {len(groups)} groups do not divide "
                             f"out_features={out_features}")
    settings = {"r": config.r, "alpha": config.alpha, "dropout": config.dropout, "use_rslora": config.use_rslora,
                "init": config.init, "use_dora": config.use_dora}
    for name, module in chosen:
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, slices=slices_for(name, config), **settings)
        else:
            replace_module(model, name, LoRALinear(module, slices=slices_for(name, config),
                                                   adapter_name=adapter_name, **settings))
