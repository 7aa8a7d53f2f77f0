"""LoRALinear: a drop-in LoRA layer over an existing ``nn.Linear`` or transformers ``Conv1D``."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastlora.config import INITS, lora_scale
from fastlora.ops import expand_slices, lora_linear


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's GPT-2 style ``Conv1D`` (weight stored as (in, out))."""
    transformers = sys.modules.get("transformers.pytorch_utils")
    return transformers is not None and isinstance(module, transformers.Conv1D)


def is_adaptable(module: nn.Module) -> bool:
    """Whether LoRALinear can wrap ``module``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` computed by the fused op; the base layer is not copied.

    Adapter parameters are named ``lora_A`` (``(r * enabled, in)``) and ``lora_B``
    (``(out / groups * enabled, r)``); with ``slices`` only the enabled output groups are adapted
    and the others' update is exactly zero by construction.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default", slices: Sequence[bool] | None = None) -> None:
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"r must be an integer >= 1, got {r!r}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.base_layer = base
        self.in_features, self.out_features = self.base_weight().shape[1], self.base_weight().shape[0]
        if slices is not None:
            slices = [bool(s) for s in slices]
            if not any(slices) or self.out_features % len(slices):
                raise ValueError(f"slices {slices} must enable at least one of groups that divide "
                                 f"out_features={self.out_features}")
        self.slices = slices
        enabled = sum(slices) if slices else 1
        rows = self.out_features // len(slices) * enabled if slices else self.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r * enabled, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(rows, r, dtype=weight.dtype, device=weight.device))
        self.merged = False
        self.reset_lora_parameters(init)
        for p in base.parameters():
            p.requires_grad_(False)

    def reset_lora_parameters(self, init: str = "default") -> None:
        """A: kaiming-uniform (``"default"``, as nn.Linear) or normal with std 1/r; B: zeros."""
        with torch.no_grad():
            for a in self.lora_A.split(self.r):  # each slice's A initialised as its own matrix
                if init == "gaussian":
                    nn.init.normal_(a, std=1.0 / self.r)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B.zero_()

    @property
    def weight(self) -> Tensor:
        """The base layer's weight as stored (as peft's LoRA layers expose it): model code reads it, e.g. its dtype."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def base_weight(self) -> Tensor:
        """The base weight as ``(out, in)``: a transposed view for Conv1D, never a copy."""
        weight = self.base_layer.weight
        return weight.t() if is_conv1d(self.base_layer) else weight

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` as ``(out, in)``, computed in float32 or wider."""
        B, A = self.lora_B, self.lora_A
        compute = torch.promote_types(A.dtype, torch.float32)
        if self.slices is not None:
            B = expand_slices(B, self.slices, self.out_features)
        return (B.to(compute) @ A.to(compute)) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        return lora_linear(x, self.base_weight(), self.base_layer.bias, self.lora_A, self.lora_B, self.scale,
                           self.dropout, self.training, slices=self.slices)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; forward is then exactly the base layer's."""
        if not self.merged:
            self._add_to_base(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (to within rounding)."""
        if self.merged:
            self._add_to_base(-self.delta_weight())
            self.merged = False

    def _add_to_base(self, delta: Tensor) -> None:
        weight = self.base_weight()
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, dropout={self.dropout:g}, slices={self.slices}, merged={self.merged}")
