"""fastlora: fused LoRA for PyTorch — one op, several backends, a drop-in layer."""

from fastlora.accelerate import AccelerateReport, accelerate, restore
from fastlora.api import inject, load_adapter
from fastlora.config import LoraConfig
from fastlora.io import save_adapter
from fastlora.layer import LoRAAdapter, LoRALinear
from fastlora.model import (
    adapter_names,
    delete_adapter,
    mark_only_lora_trainable,
    merge,
    set_adapter,
    trainable_summary,
    unload,
    unmerge,
    use_adapters,
)
from fastlora.ops import lora_linear
from fastlora.ops.dispatch import BackendStatus, backends
from fastlora.ops.mixed import lora_linear_mixed

__version__ = "0.1.0"

__all__ = [
    "AccelerateReport",
    "BackendStatus",
    "LoRAAdapter",
    "LoRALinear",
    "LoraConfig",
    "__version__",
    "accelerate",
    "adapter_names",
    "backends",
    "delete_adapter",
    "inject",
    "load_adapter",
    "lora_linear",
    "lora_linear_mixed",
    "mark_only_lora_trainable",
    "merge",
    "restore",
    "save_adapter",
    "set_adapter",
    "trainable_summary",
    "unload",
    "unmerge",
    "use_adapters",
]
