"""fastlora: fused LoRA for PyTorch — one op, several backends, a drop-in layer."""

from fastlora.config import LoraConfig
from fastlora.io import load_adapter, save_adapter
from fastlora.layer import LoRALinear
from fastlora.model import inject, mark_only_lora_trainable, merge, trainable_summary, unload, unmerge
from fastlora.ops import lora_linear
from fastlora.ops.dispatch import BackendStatus, backends

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "LoRALinear",
    "LoraConfig",
    "__version__",
    "backends",
    "inject",
    "load_adapter",
    "lora_linear",
    "mark_only_lora_trainable",
    "merge",
    "save_adapter",
    "trainable_summary",
    "unload",
    "unmerge",
]
