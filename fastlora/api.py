"""The public functions that add adapters to a model, above the modules they use: :func:`inject` and
:func:`load_adapter` put LoRA layers in (:mod:`fastlora.targets`, :mod:`fastlora.io`), train only the adapters,
and give a transformers model the ``save_pretrained`` of :mod:`fastlora.hf`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fastlora.config import LoraConfig
from fastlora.hf import attach
from fastlora.io import load_layers
from fastlora.layer import DEFAULT_ADAPTER
from fastlora.model import mark_only_lora_trainable
from fastlora.targets import inject_layers


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Add adapter ``adapter_name`` to every target module of ``model``, in place, and freeze the rest.

    A target that is a plain Linear/Conv1D is replaced by a LoRALinear around it with this adapter
    active; a target that already is a LoRALinear gets the adapter added beside its others (its active
    adapter does not change: see :func:`fastlora.set_adapter`). Everything is checked before the model is
    touched: on error the model is unchanged. A transformers model's ``save_pretrained`` (and so ``Trainer``)
    then writes the base weights under their own names and the adapters in peft's format (:mod:`fastlora.hf`).
    """
    inject_layers(model, config, adapter_name)
    mark_only_lora_trainable(model)
    attach(model)
    return model


def load_adapter(model: nn.Module, directory: str | Path, name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load a LoRA adapter saved by fastlora or peft as adapter ``name``.

    Modules without LoRA get a LoRA layer (with this adapter active); LoRA layers that lack the
    adapter get it added beside their others (their active adapter does not change: see
    :func:`fastlora.set_adapter`); an adapter of the same name is overwritten. Before anything changes,
    the config (r, ``rank_pattern``, ``alpha_pattern``, target modules), fastlora's slices metadata and the
    tensors' keys, shapes, dtypes and values are checked against each other and the model: on error the model
    is left as it was. A save of the folder that a kill interrupted after its commit point is finished first
    (:mod:`fastlora.atomic`). A transformers model's ``save_pretrained`` then writes base and adapters
    loadably, as after :func:`inject`.
    """
    model = load_layers(model, directory, name)
    mark_only_lora_trainable(model)
    attach(model)
    return model
