"""fastlora: fused LoRA for PyTorch — one op, several backends, a drop-in layer."""

from fastlora.ops import lora_linear
from fastlora.ops.dispatch import BackendStatus, backends

__version__ = "0.1.0"

__all__ = ["BackendStatus", "__version__", "backends", "lora_linear"]
