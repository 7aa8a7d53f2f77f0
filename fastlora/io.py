"""Adapters on disk in peft's format: ``adapter_model.safetensors`` + ``adapter_config.json`` per adapter.

Sliced layers (e.g. q and v of GPT-2's ``c_attn``) are written as an exact whole-module peft
adapter of rank ``r * enabled`` whose B is block-structured with zero rows for disabled groups;
the slices are recorded in the safetensors metadata so fastlora reads them back as slices.
Only safetensors are read (never pickle), and everything is validated before the model changes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fastlora.atomic import reading, transaction
from fastlora.config import ALL_LINEAR, LoraConfig, lora_scale
from fastlora.layer import DEFAULT_ADAPTER, LoRAAdapter, LoRALinear, check_adapter_name, is_adaptable, is_conv1d
from fastlora.model import adapter_names
from fastlora.ops.reference import enabled_rows
from fastlora.targets import lora_layers, name_matches, replace_module

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
SLICES_METADATA = "fastlora_slices"
MAGNITUDE = "lora_magnitude_vector"  # DoRA's key, after the module's name (peft's: no ".weight")
SUBFOLDER_METADATA = "fastlora_subfolder"  # the adapter a full save wrote to <dir>/<name>


def _peft_alpha(adapter: LoRAAdapter, peft_rank: int) -> float:
    """The peft ``lora_alpha`` that gives ``adapter.scale`` at rank ``peft_rank``."""
    return adapter.scale * (math.sqrt(peft_rank) if adapter.use_rslora else peft_rank)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / FSDP-style ``.module`` and ``torch.compile``'s ``_orig_mod``
    wrappers, so that saved module names are the model's own (as peft expects)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_adapter(model: nn.Module, directory: str | Path, config: LoraConfig | None = None,
                 name: str | None = None) -> None:
    """Write LoRA adapters in peft's format (loadable by ``PeftModel.from_pretrained``).

    With ``name``, that adapter alone, in ``directory``. Without, exactly the model's adapters, in peft's
    multi-adapter layout: ``default`` in ``directory`` itself and each other adapter in ``directory/<name>``;
    the adapter files of earlier saves that this one does not write are removed (the folder's own when the model
    has no ``default``, and those an earlier full save wrote to ``directory/<name>`` for an adapter the model no
    longer has). Other files are kept. The files change in place as one commit
    (:func:`fastlora.atomic.transaction`): whatever happens during the save, the folder holds the complete
    previous adapters or the complete new ones, and stays itself (a mount point, a working directory, its owner
    and mode).
    """
    model = unwrap(model)
    held = adapter_names(model)
    if not held:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save")
    if name is not None and name not in held:
        raise ValueError(f"{type(model).__name__} has no adapter named {name!r} (it has {held})")
    names = [name] if name is not None else held
    for adapter_name in names:
        check_adapter_name(adapter_name)
    files = {adapter_name: _serialize(model, adapter_name, config) for adapter_name in names}
    with transaction(directory) as changes:
        for adapter_name, (tensors, metadata, peft_config) in files.items():
            where = "" if name is not None or adapter_name == DEFAULT_ADAPTER else f"{adapter_name}/"
            if where:  # recorded, so that a later full save of a model without this adapter removes it
                metadata = {**metadata, SUBFOLDER_METADATA: adapter_name}
            save_file(tensors, str(changes.write(where + WEIGHTS_NAME)), metadata=metadata)
            changes.write(where + CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
        if name is None:
            for stale in _stale_files(changes.folder, held):
                changes.delete(stale)


def _stale_files(folder: Path, held: list[str]) -> list[str]:
    """The adapter files in ``folder`` that a full save of adapters ``held`` does not write: the folder's own
    without a default adapter, and those of each subfolder an earlier full save wrote for an adapter not held."""
    places = [""] if DEFAULT_ADAPTER not in held else []
    places += [f"{entry.name}/" for entry in os.scandir(folder) if entry.name not in held
               and entry.is_dir(follow_symlinks=False) and _saved_as(Path(entry.path)) == entry.name]
    return [place + file for place in places for file in (WEIGHTS_NAME, CONFIG_NAME)
            if os.path.lexists(folder / place / file)]


def _saved_as(folder: Path) -> str | None:
    """The adapter that a full save wrote to ``folder`` as a subfolder of its own folder, or None."""
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
            return (f.metadata() or {}).get(SUBFOLDER_METADATA)
    except (OSError, SafetensorError):
        return None


def _serialize(model: nn.Module, adapter_name: str,
               config: LoraConfig | None) -> tuple[dict[str, Tensor], dict[str, str], dict]:
    """An adapter's tensors, safetensors metadata and peft config."""
    adapters = {n: (layer, layer.adapter(adapter_name)) for n, layer in lora_layers(model)
                if adapter_name in layer.adapters}
    first = next(iter(adapters.values()))[1]
    dora = {name for name, (_, adapter) in adapters.items() if adapter.use_dora}
    if dora and len(dora) != len(adapters):
        raise ValueError(f"adapter {adapter_name!r} is DoRA on {sorted(dora)[:3]} but LoRA on "
                         f"{sorted(adapters.keys() - dora)[:3]}: peft's format has one use_dora per adapter")
    config = config or LoraConfig(r=first.r, alpha=first.alpha, dropout=first.dropout,
                                  target_modules=sorted(adapters), use_rslora=first.use_rslora, use_dora=bool(dora))
    tensors, ranks, alphas, slices = {}, {}, {}, {}
    for module_name, (layer, adapter) in adapters.items():
        if adapter.slices is not None:
            slices[module_name] = adapter.slices
        tensors[f"{PREFIX}{module_name}.lora_A.weight"] = adapter.lora_A.detach().contiguous()
        tensors[f"{PREFIX}{module_name}.lora_B.weight"] = adapter.full_B(layer.out_features).detach().contiguous()
        if adapter.use_dora:
            tensors[f"{PREFIX}{module_name}.{MAGNITUDE}"] = _full_magnitude(layer, adapter)
        ranks[module_name] = adapter.lora_A.shape[0]
        alphas[module_name] = _peft_alpha(adapter, ranks[module_name])
    fan_in_fan_out = any(is_conv1d(layer.base_layer) for layer, _ in adapters.values())
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = config.to_peft(ranks, alphas, fan_in_fan_out, base_name)
    return tensors, {"format": "pt", SLICES_METADATA: json.dumps(slices)}, peft_config


def _full_magnitude(layer: LoRALinear, adapter: LoRAAdapter) -> Tensor:
    """DoRA's magnitude over every output feature, as peft holds it: a disabled slice's features get their norms
    (B is zero there), so that their factor m / n is 1 in peft too."""
    magnitude = adapter.magnitude.detach()
    if adapter.slices is None:
        return magnitude.contiguous()
    full = adapter.norms(layer.base_weight()).to(magnitude.dtype)
    rows = layer.out_features // len(adapter.slices)
    return full.masked_scatter(torch.tensor(adapter.slices, device=full.device).repeat_interleave(rows), magnitude)


@dataclass
class _Planned:
    """One module's adapter, validated and ready to load."""

    name: str
    lora_A: Tensor
    lora_B: Tensor  # compact (stacked per-slice) when slices is set
    alpha: float
    slices: list[bool] | None
    magnitude: Tensor | None  # DoRA's, compact as B


def _read(directory: Path) -> tuple[dict, dict[str, Tensor], dict[str, list[bool]]]:
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_path.is_file():
        pickled = [p.name for p in directory.glob("adapter_model.bin")]
        why = f" ({pickled[0]} exists, but fastlora never reads pickle files)" if pickled else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{why}")
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        peft_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(peft_config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(peft_config).__name__}")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
            metadata = f.metadata() or {}
        saved_slices = json.loads(metadata.get(SLICES_METADATA, "{}"))
    except (SafetensorError, json.JSONDecodeError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from None
    return peft_config, tensors, saved_slices


def _group_by_module(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, dot, part = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or not dot or part not in ("A.weight", "B.weight", "magnitude_vector"):
            raise ValueError(f"unexpected key {key!r} in the adapter: expected '{PREFIX}<module>.lora_A.weight' / "
                             f"'.lora_B.weight' (and DoRA's '.{MAGNITUDE}')")
        modules.setdefault(name, {})[part[0]] = value
    for name, parts in modules.items():
        for missing in sorted({"A", "B"} - parts.keys()):
            raise ValueError(f"missing key {PREFIX}{name}.lora_{missing}.weight in the adapter")
    return modules


def _compact_B(name: str, B: Tensor, slices: list[bool], rank: int) -> Tensor:
    """The stacked per-slice B of a block-structured whole-module B; an error if it is not one."""
    rows = B.shape[0] // len(slices)
    blocks, j = [], 0
    for g, on in enumerate(slices):
        row_block = B[g * rows:(g + 1) * rows]
        expected = torch.zeros_like(row_block)
        if on:
            expected[:, j * rank:(j + 1) * rank] = row_block[:, j * rank:(j + 1) * rank]
            blocks.append(row_block[:, j * rank:(j + 1) * rank])
            j += 1
        if not torch.equal(row_block, expected):
            raise ValueError(f"{PREFIX}{name}.lora_B.weight is not block-structured for slices {slices}: "
                             f"group {g} has non-zero entries outside its own rank columns")
    return torch.cat(blocks)


def _plan(model: nn.Module, peft_config: dict, tensors: dict[str, Tensor],
          saved_slices: dict[str, list[bool]], adapter_name: str) -> list[_Planned]:
    """Check the config, the tensors and the slices metadata against each other and the model; the load plan,
    or an error naming the file, the key and the disagreement."""
    config = LoraConfig.from_peft(peft_config)
    rank_pattern = _pattern(peft_config, "rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool)
                            and v >= 1, "an integer >= 1")
    alpha_pattern = _pattern(peft_config, "alpha_pattern", lambda v: isinstance(v, (int, float))
                             and not isinstance(v, bool) and math.isfinite(v) and v > 0, "a finite number > 0")
    existing = {n: layer for n, layer in lora_layers(model) if adapter_name in layer.adapters}
    modules = _group_by_module(tensors)
    _check_slices_metadata(saved_slices, modules)
    plan = []
    for name, parts in sorted(modules.items()):
        A, B = parts["A"], parts["B"]
        for part, tensor in parts.items():
            key = f"{PREFIX}{name}." + (MAGNITUDE if part == "m" else f"lora_{part}.weight")
            if not tensor.is_floating_point():
                raise ValueError(f"{WEIGHTS_NAME}: {key} is {tensor.dtype}; LoRA weights are floating point")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{WEIGHTS_NAME}: {key} holds NaN or infinite values")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter key {PREFIX}{name}.lora_A.weight names module {name!r}, "
                             f"which {type(model).__name__} does not have (an adapter for another model?)") from None
        if not isinstance(module, LoRALinear) and not is_adaptable(module):
            raise ValueError(f"adapter key {PREFIX}{name}.lora_A.weight targets {name!r}, a {type(module).__name__}")
        base = module.base_weight() if isinstance(module, LoRALinear) else (
            module.weight.t() if is_conv1d(module) else module.weight)
        out_features, in_features = base.shape
        if A.dim() != 2 or A.shape[1] != in_features or B.dim() != 2 or tuple(B.shape) != (out_features, A.shape[0]):
            raise ValueError(f"adapter shapes for {name!r} do not fit the model: lora_A {tuple(A.shape)}, "
                             f"lora_B {tuple(B.shape)}; the module is ({out_features}, {in_features}) so expected "
                             f"lora_A (r, {in_features}) and lora_B ({out_features}, r)")
        rank = A.shape[0]
        configured = _pattern_value(rank_pattern, name, config.r)
        if rank != configured:
            source = "its rank_pattern" if name in rank_pattern or configured != config.r else f"r={config.r}"
            raise ValueError(f"{CONFIG_NAME} gives {name!r} rank {configured} ({source}) but {WEIGHTS_NAME} holds "
                             f"rank {rank} tensors for it: the two files are not from the same adapter")
        own = module.adapters[adapter_name] if isinstance(module, LoRALinear) and adapter_name in module.adapters \
            else None
        if own is not None and module.merged_adapter == adapter_name:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight of {name!r}: unmerge it "
                             "before loading over it")
        if own is not None and name in saved_slices and saved_slices[name] != own.slices:
            raise ValueError(f"{WEIGHTS_NAME} records slices {saved_slices[name]} for {name!r} but the model's "
                             f"adapter {adapter_name!r} there has slices {own.slices}")
        slices = own.slices if own is not None else saved_slices.get(name)
        alpha = float(_pattern_value(alpha_pattern, name, config.alpha))
        if slices is not None:
            enabled = sum(slices)
            if out_features % len(slices) or rank % enabled:
                raise ValueError(f"adapter for {name!r} (rank {rank}) cannot be split into slices {slices}")
            B = _compact_B(name, B, slices, rank // enabled)
        if own is not None and tuple(own.lora_A.shape) != tuple(A.shape):
            raise ValueError(f"adapter lora_A for {name!r} has shape {tuple(A.shape)} but the model's "
                             f"LoRA layer has {tuple(own.lora_A.shape)} for adapter {adapter_name!r}")
        magnitude = _planned_magnitude(name, parts.get("m"), config.use_dora, out_features, slices)
        if own is not None and own.use_dora != config.use_dora:
            raise ValueError(f"{CONFIG_NAME} has use_dora={config.use_dora} but the model's adapter {adapter_name!r} "
                             f"at {name!r} is {'DoRA' if own.use_dora else 'LoRA'}")
        plan.append(_Planned(name, A, B, alpha, slices, magnitude))
    _check_targets(model, peft_config, config, modules)
    missing = sorted(existing.keys() - modules.keys())
    if missing:
        raise ValueError(f"the adapter has no weights for the model's LoRA layers {missing} "
                         f"(which have adapter {adapter_name!r})")
    return plan


def _planned_magnitude(name: str, magnitude: Tensor | None, use_dora: bool, out_features: int,
                       slices: list[bool] | None) -> Tensor | None:
    """DoRA's magnitude for module ``name`` checked against the config and the module (compact for slices)."""
    key = f"{PREFIX}{name}.{MAGNITUDE}"
    if not use_dora:
        if magnitude is not None:
            raise ValueError(f"{WEIGHTS_NAME} holds {key} but {CONFIG_NAME} has use_dora=false")
        return None
    if magnitude is None:
        raise ValueError(f"{CONFIG_NAME} has use_dora=true but {WEIGHTS_NAME} has no {key}")
    if tuple(magnitude.shape) != (out_features,):
        raise ValueError(f"{key} has shape {tuple(magnitude.shape)}; the module has {out_features} output features")
    return enabled_rows(magnitude, slices)


def _pattern(peft_config: dict, key: str, valid, what: str) -> dict:
    pattern = peft_config.get(key) or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"{CONFIG_NAME}: {key} must be an object, got {pattern!r}")
    for name, value in pattern.items():
        if not valid(value):
            raise ValueError(f"{CONFIG_NAME}: {key}[{name!r}] must be {what}, got {value!r}")
    return pattern


def _check_slices_metadata(saved_slices: object, modules: dict[str, dict[str, Tensor]]) -> None:
    where = f"{WEIGHTS_NAME} metadata {SLICES_METADATA!r}"
    if not isinstance(saved_slices, dict):
        raise ValueError(f"{where} must be an object, got {saved_slices!r}")
    for name, groups in saved_slices.items():
        if name not in modules:
            raise ValueError(f"{where} names {name!r}, which has no weights in the file")
        if not (isinstance(groups, list) and groups and all(isinstance(g, bool) for g in groups) and any(groups)):
            raise ValueError(f"{where}[{name!r}] must be a list of booleans with at least one true, got {groups!r}")


def _check_targets(model: nn.Module, peft_config: dict, config: LoraConfig,
                   modules: dict[str, dict[str, Tensor]]) -> None:
    """The config's target_modules include every module with weights, and (unless the config narrows them
    with layers or exclusions fastlora does not read) every module they select has weights."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        return
    untargeted = sorted(name for name in modules if not name_matches(name, targets))
    if untargeted:
        raise ValueError(f"{CONFIG_NAME}'s target_modules {targets!r} do not select {untargeted[:3]}, which "
                         f"{WEIGHTS_NAME} has weights for: the two files are not from the same adapter")
    if any(peft_config.get(key) for key in ("layers_to_transform", "layers_pattern", "exclude_modules")):
        return
    inside_lora = {f"{name}.{sub}" for name, layer in lora_layers(model) for sub, _ in layer.named_modules() if sub}
    selected = {name for name, module in model.named_modules() if name and name not in inside_lora
                and (isinstance(module, LoRALinear) or is_adaptable(module)) and name_matches(name, targets)}
    without = sorted(selected - modules.keys())
    if without:
        raise ValueError(f"{CONFIG_NAME}'s target_modules {targets!r} select {without[:3]} of "
                         f"{type(model).__name__}, which {WEIGHTS_NAME} has no weights for (an adapter for "
                         "another model, or a truncated file?)")


def _pattern_value(pattern: dict, name: str, default):
    """peft's per-module override: the value of the first key that, as a regex, matches the end of ``name``
    at a dot boundary (a full name, a suffix, or a pattern such as ``layers\\.1\\..*k_proj``)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_layers(model: nn.Module, directory: str | Path, name: str = DEFAULT_ADAPTER) -> nn.Module:
    """The layers of :func:`fastlora.load_adapter`: the adapter in ``directory``, checked, into ``model`` (unwrapped,
    which is returned) as adapter ``name``."""
    model = unwrap(model)
    check_adapter_name(name)
    directory = Path(directory)
    with reading(directory):
        peft_config, tensors, saved_slices = _read(directory)
    try:
        plan = _plan(model, peft_config, tensors, saved_slices, name)
    except ValueError as error:
        raise ValueError(f"adapter in {directory}: {error}") from None
    config = LoraConfig.from_peft(peft_config)
    for item in plan:
        module = model.get_submodule(item.name)
        enabled = sum(item.slices) if item.slices else 1
        rank = item.lora_A.shape[0] // enabled
        settings = {"r": rank, "alpha": _alpha_for(item, rank, config), "dropout": config.dropout,
                    "use_rslora": config.use_rslora, "slices": item.slices, "use_dora": config.use_dora}
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, adapter_name=name, **settings)
            replace_module(model, item.name, module)
        elif name not in module.adapters:
            module.add_adapter(name, **settings)
        adapter = module.adapters[name]
        # an adapter of the same name is overwritten whole: its hyper-parameters too, not only A and B
        adapter.alpha, adapter.dropout, adapter.use_rslora = (float(settings["alpha"]), float(settings["dropout"]),
                                                              settings["use_rslora"])
        adapter.scale = lora_scale(adapter.r, adapter.alpha, adapter.use_rslora)
        with torch.no_grad():
            adapter.lora_A.copy_(item.lora_A)
            adapter.lora_B.copy_(item.lora_B)
            if item.magnitude is not None:
                adapter.lora_magnitude_vector.copy_(item.magnitude)
    return model


def _alpha_for(item: _Planned, rank: int, config: LoraConfig) -> float:
    """The alpha that, at the layer's own rank, keeps the scale the adapter was saved with."""
    peft_rank = item.lora_A.shape[0]
    if config.use_rslora:
        return item.alpha / math.sqrt(peft_rank) * math.sqrt(rank)
    return item.alpha / peft_rank * rank
