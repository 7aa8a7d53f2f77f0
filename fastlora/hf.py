"""Injected transformers models under ``save_pretrained`` (and so under ``Trainer``): files that load back as expected.

:func:`fastlora.inject` and :func:`fastlora.load_adapter` call :func:`attach` on a ``PreTrainedModel``. Its
``save_pretrained`` then writes

- ``model.safetensors``: every wrapped layer's base weights under the layer's own names (``…c_attn.weight``,
  as the model without LoRA has them), so ``from_pretrained`` of the folder restores the base model, plus the
  LoRA parameters under fastlora's names, so that ``Trainer`` checkpoints resume exactly;
- ``adapter_model.safetensors`` + ``adapter_config.json``: the adapters in peft's format
  (:func:`fastlora.save_adapter`), which ``from_pretrained`` of the folder loads too when peft is installed.

Loading a state dict with base weights under their own names into an injected model puts them into the
wrapped layers (``Trainer`` resumes that way, and a plain model's checkpoint loads into an injected model).
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import Tensor, nn

from fastlora.io import save_adapter
from fastlora.targets import lora_layers

_BASE = ".base_layer"


def _is_pretrained_model(model: nn.Module) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


class SavePretrained:
    """An injected model's ``save_pretrained``: the class's, with base weights under their own names, then the
    adapters in peft's format beside them (see the module docstring). Without LoRA layers, the class's alone."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | Path, *args, state_dict: dict[str, Tensor] | None = None, **kwargs):
        model = self.model
        save = type(model).save_pretrained
        layers = dict(lora_layers(model))
        if not layers:
            return save(model, save_directory, *args, state_dict=state_dict, **kwargs)
        merged = [name for name, layer in layers.items() if layer.merged]
        if merged:
            raise ValueError(f"layers {merged[:3]} have an adapter merged into their base weight: fastlora.unload("
                             "model) first to save a merged plain model, or fastlora.unmerge(model) to save base and "
                             "adapters")
        state_dict = model.state_dict() if state_dict is None else state_dict
        result = save(model, save_directory, *args, state_dict=own_names(state_dict, layers), **kwargs)
        if kwargs.get("is_main_process", True):
            save_adapter(model, save_directory)
        return result


def own_names(state_dict: dict[str, Tensor], layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    """``state_dict`` with each LoRA layer's ``<name>.base_layer.<p>`` renamed ``<name>.<p>``."""
    renamed = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        owner = module.removesuffix(_BASE)
        renamed[f"{owner}.{leaf}" if module.endswith(_BASE) and owner in layers else key] = value
    return renamed


def _load_base_names(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """A load_state_dict pre-hook: base weights saved under a LoRA layer's own names go to its base layer."""
    for name, layer in lora_layers(module):
        for leaf, _ in layer.base_layer.named_parameters(recurse=False):
            own, wrapped = f"{prefix}{name}.{leaf}", f"{prefix}{name}{_BASE}.{leaf}"
            if own in state_dict and wrapped not in state_dict:
                state_dict[wrapped] = state_dict.pop(own)


def attach(model: nn.Module) -> None:
    """Give a transformers ``PreTrainedModel`` the saving and loading above (once); other models are left alone."""
    if not _is_pretrained_model(model) or isinstance(vars(model).get("save_pretrained"), SavePretrained):
        return
    model.save_pretrained = SavePretrained(model)
    model.register_load_state_dict_pre_hook(_load_base_names)
