"""``accelerate`` / ``restore``: run the LoRA layers of an existing peft model through fastlora's op, in place.

Each supported peft ``lora.Linear`` keeps its module, parameters, adapters and state; only its class changes,
to :class:`FusedLinear`, a subclass whose ``forward`` calls :func:`fastlora.lora_linear` (or
:func:`fastlora.lora_linear_mixed` for peft's ``adapter_names=`` batches) and hands every case it does not
cover to peft's own forward. :func:`restore` changes the class back. peft itself is imported on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastlora.layer import is_conv1d
from fastlora.ops import lora_linear
from fastlora.ops.mixed import lora_linear_mixed

_BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # what the op's autocast casts


@dataclass(frozen=True)
class AccelerateReport:
    """Which peft LoRA layers run through fastlora's op (``fused``) and which stay on peft's forward, and why."""

    fused: list[str]
    unfused: dict[str, str]

    def __str__(self) -> str:
        total = len(self.fused) + len(self.unfused)
        lines = [f"fastlora runs {len(self.fused)} of {total} peft LoRA layers fused"]
        lines += [f"  on peft's forward: {name}: {why}" for name, why in self.unfused.items()]
        return "\n".join(lines)


def _lora():
    try:
        from peft.tuners import lora
    except ImportError as error:
        raise ImportError("fastlora.accelerate works on peft models: install peft") from error
    return lora


@functools.cache
def _fused_class() -> type:
    class FusedLinear(_lora().Linear):
        """peft's ``lora.Linear`` computing through fastlora's op; peft's forward for whatever the op does not do."""

        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            out = _fused_forward(self, x, args, kwargs)
            return super().forward(x, *args, **kwargs) if out is None else out

    # repr and peft's get_layer_status show peft's name ("Linear"); pickle finds the class by its qualified name.
    FusedLinear.__module__, FusedLinear.__qualname__, FusedLinear.__name__ = __name__, "FusedLinear", "Linear"
    return FusedLinear


def __getattr__(name: str):
    if name == "FusedLinear":  # the class exists once peft is imported; pickle finds it here
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- what can be fused --------------------------------------------------------------------------------------------

def _plain_dora(layer: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` is peft's DoRA on a linear layer, as the op computes it (``magnitude=``)."""
    if not layer.use_dora.get(name) or name not in layer.lora_magnitude_vector:  # a ModuleDict: no .get
        return False
    magnitude = layer.lora_magnitude_vector[name]
    return type(layer.lora_variant.get(name)).__name__ == "DoraLinearVariant" \
        and type(magnitude).__name__ == "DoraLinearLayer" and isinstance(magnitude.weight, Tensor)


def _magnitude(layer: nn.Module, name: str) -> Tensor | None:
    return layer.lora_magnitude_vector[name].weight if layer.use_dora.get(name) else None


def _adapter_problem(layer: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` of a peft lora.Linear cannot run through the op, or None. Cheap: runs on every call."""
    if (name in layer.lora_variant or layer.use_dora.get(name) or name in layer.lora_magnitude_vector) \
            and not _plain_dora(layer, name):
        variant = layer.lora_variant.get(name)
        return f"adapter {name!r} is a LoRA variant fastlora does not fuse ({type(variant).__name__})"
    if layer.lora_bias.get(name):
        return f"adapter {name!r} has lora_bias"
    A, B, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return f"adapter {name!r} has lora_A/lora_B modules other than bias-free nn.Linear"
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"adapter {name!r} has a {type(dropout).__name__} as lora_dropout"
    if not isinstance(layer.scaling.get(name), (int, float)):
        return f"adapter {name!r} has a scaling of type {type(layer.scaling.get(name)).__name__}"
    return None


def _layer_problem(layer: nn.Module) -> str | None:
    """Why a peft LoRA layer stays on peft's forward, or None when it can be fused."""
    lora = _lora()
    if not isinstance(layer, lora.Linear) or type(layer) not in (lora.Linear, _fused_class()):
        return f"{type(layer).__module__}.{type(layer).__name__}: fastlora fuses peft's lora.Linear only"
    base = layer.get_base_layer()
    if layer.base_layer is not base:
        return f"base layer is wrapped by a {type(layer.base_layer).__name__} whose forward fastlora would bypass"
    if type(base) is not nn.Linear and not (is_conv1d(base) and type(base).__name__ == "Conv1D"):
        return (f"base layer is a {type(base).__module__}.{type(base).__name__} (fastlora needs a plain nn.Linear "
                "or transformers Conv1D: quantized and custom base layers stay on peft's forward)")
    weight = base.weight
    if type(weight.data) is not Tensor or not weight.dtype.is_floating_point or weight.is_meta:
        return f"base weight is a {type(weight.data).__name__} of {weight.dtype} on {weight.device}, not a plain tensor"
    hooked = _hooked(layer)
    if hooked is not None:
        return f"{hooked} has hooks (or a replaced forward) that fastlora's op would bypass; peft's forward runs"
    for name in layer.lora_A:
        problem = _adapter_problem(layer, name)
        if problem is not None:
            return problem
    return None


_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _module_hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _hooked(layer: nn.Module) -> str | None:
    """Which module that peft's forward calls (the base layer, an adapter's lora_A, lora_B or dropout) has hooks
    or a replaced forward, which the op would skip; None when none has. Cheap: checked on every call, since
    hooks come and go (offloading, activation statistics) after :func:`accelerate`."""
    if any(_GLOBAL_HOOKS):
        return "every module (global module hooks)"
    if _module_hooked(layer.base_layer):
        return "the base layer"
    for kind in ("lora_A", "lora_B", "lora_dropout"):
        for name, module in getattr(layer, kind).items():
            if _module_hooked(module):
                return f"{kind}[{name!r}]"
    return None


# -- the forward --------------------------------------------------------------------------------------------------

def _dropout_p(layer: nn.Module, name: str) -> float:
    dropout = layer.lora_dropout[name]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _dtypes_fit(layer: nn.Module, names: Sequence[str], x: Tensor, base: nn.Module) -> bool:
    """Whether the op takes these dtypes: under autocast, any it casts; else one dtype throughout, except
    fp32 LoRA parameters over a 16-bit layer (as peft keeps them)."""
    frozen = [t.dtype for t in (base.weight, base.bias) if t is not None]
    lora = [t.weight.dtype for n in names for t in (layer.lora_A[n], layer.lora_B[n])]
    lora += [_magnitude(layer, n).dtype for n in names if layer.use_dora.get(n)]
    if torch.is_autocast_enabled(x.device.type):
        return all(d in _CASTABLE for d in (x.dtype, *frozen, *lora))
    fp32_allowed = x.dtype in _CASTABLE[1:]
    return all(d == x.dtype for d in frozen) and all(d == x.dtype or (fp32_allowed and d == torch.float32)
                                                    for d in lora)


def _fused_forward(layer: nn.Module, x: Tensor, args: tuple, kwargs: dict) -> Tensor | None:
    """The layer's output through fastlora's op, or None where peft's forward must run: adapters disabled
    or merged, extra arguments, a trainable base weight, an adapter the op cannot run, or dtypes it does not take."""
    adapter_names = kwargs.get("adapter_names")
    if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
        return None
    if layer.disable_adapters or layer.merged or _hooked(layer) is not None:
        return None
    base = layer.base_layer
    weight, bias = base.weight, base.bias
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None  # the op keeps W and b frozen
    W = weight.t() if is_conv1d(base) else weight
    if adapter_names is not None:
        return _mixed_forward(layer, x, W, bias, adapter_names)
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active or any(_adapter_problem(layer, name) is not None for name in active):
        return None
    if not _dtypes_fit(layer, active[:1], x, base):
        return None  # peft's forward decides (an error, or its own casts)
    if any(layer.use_dora.get(name) for name in active[1:]):
        return None  # several adapters, DoRA beyond the first: peft's forward adds them
    first = active[0]
    result = lora_linear(x, W, bias, layer.lora_A[first].weight, layer.lora_B[first].weight, layer.scaling[first],
                         _dropout_p(layer, first), True, magnitude=_magnitude(layer, first))
    dtype = result.dtype
    for name in active[1:]:  # further active adapters add their update as peft does
        lora_x = layer._cast_input_dtype(x, layer.lora_A[name].weight.dtype)
        update = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](lora_x)))
        result = result + update * layer.scaling[name]
    return result.to(dtype)


def _mixed_forward(layer: nn.Module, x: Tensor, W: Tensor, bias: Tensor | None,
                   adapter_names: Sequence[str]) -> Tensor | None:
    """peft's ``adapter_names=`` batch (row i gets adapter ``adapter_names[i]``; ``"__base__"`` or an adapter
    this layer lacks: the base alone) through :func:`fastlora.lora_linear_mixed`."""
    layer._check_forward_args(x, adapter_names=adapter_names)  # peft's own checks and messages
    used = [n for n in dict.fromkeys(adapter_names) if n != _BASE and n in layer.lora_A]
    if x.dim() < 2 or not used or any(_adapter_problem(layer, name) is not None for name in used):
        return None
    if not _dtypes_fit(layer, used, x, layer.base_layer):
        return None
    index = {name: i for i, name in enumerate(used)}
    ids = torch.tensor([index.get(name, -1) for name in adapter_names], dtype=torch.int64)
    return lora_linear_mixed(x, W, bias, [layer.lora_A[n].weight for n in used],
                             [layer.lora_B[n].weight for n in used], [layer.scaling[n] for n in used], ids,
                             [_dropout_p(layer, n) for n in used], True)


# -- the public functions -----------------------------------------------------------------------------------------

def _peft_layers(model: nn.Module, argument: str) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be a torch.nn.Module (a peft model), got {type(model).__name__}")
    lora = _lora()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, lora.LoraLayer)]


def accelerate(model: nn.Module, strict: bool = False) -> AccelerateReport:
    """Make every peft ``lora.Linear`` in ``model`` that fastlora supports compute through fastlora's fused op.

    In place: the module tree, parameter objects, adapters and peft's API (``save_pretrained``,
    ``merge_and_unload``, ``set_adapter``, ``disable_adapter``, ``adapter_names=``) stay as they are.
    DoRA adapters run through the op too. Layers fastlora cannot run (other variants, ``lora_bias``, quantized or
    hooked base layers, embeddings, convolutions) keep peft's forward. With ``strict``, any such layer is an error
    raised before anything changes. Calling it again is harmless: it picks up layers added since and puts layers that
    can no longer be fused back on peft's forward. A fused layer also checks on every call for hooks added since
    (on its base layer, its adapters' modules, or every module) and runs peft's forward while they are there.

    Returns:
        An :class:`AccelerateReport`: the fused layers' names, and each unfused layer's reason.
    """
    layers = _peft_layers(model, "model")
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) holds no peft LoRA layers")
    problems = {name: _layer_problem(module) for name, module in layers}
    unfused = {name: why for name, why in problems.items() if why is not None}
    if strict and unfused:
        listed = "; ".join(f"{name}: {why}" for name, why in list(unfused.items())[:5])
        raise ValueError(f"strict=True: {len(unfused)} peft LoRA layers cannot be fused ({listed})")
    lora, fused_class = _lora(), _fused_class()
    for name, module in layers:
        if problems[name] is None:
            module.__class__ = fused_class
        elif type(module) is fused_class:  # fused before, unfusable now (e.g. hooks added since): say what is true
            module.__class__ = lora.Linear
    return AccelerateReport(fused=[name for name, why in problems.items() if why is None], unfused=unfused)


def restore(model: nn.Module) -> list[str]:
    """Undo :func:`accelerate`: every fused layer runs peft's own forward again. Returns the restored names."""
    layers = _peft_layers(model, "model")
    lora, fused_class = _lora(), _fused_class()
    restored = []
    for name, module in layers:
        if type(module) is fused_class:
            module.__class__ = lora.Linear
            restored.append(name)
    return restored
