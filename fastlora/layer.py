"""LoRALinear: a drop-in LoRA layer over an existing ``nn.Linear`` or transformers ``Conv1D``, with named adapters."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastlora.config import INITS, lora_scale
from fastlora.ops import expand_slices, lora_linear
from fastlora.ops.mixed import lora_linear_mixed
from fastlora.ops.reference import dora_factor, dora_norm, enabled_rows
from fastlora.ops.routing import AdapterRouting

DEFAULT_ADAPTER = "default"
MAX_NAME_BYTES = 200  # adapter names become folder names: common file systems allow 255 bytes
_FORBIDDEN = set('./\\<>:"|?*')  # '.': a module key separator; the others cannot be in portable folder names
_RESERVED = {"con", "prn", "aux", "nul", *(f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10))}
_MODULE_DICT = nn.ModuleDict()


def check_adapter_name(name: object) -> None:
    """Raise ValueError unless ``name`` can name an adapter: a key of torch's ModuleDict (as in peft) and a
    portable folder name (peft's layout saves adapter ``name`` in ``<dir>/<name>``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    bad = sorted({c for c in name if c in _FORBIDDEN or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ValueError(f"adapter name must be a non-empty string without '.' (it separates module names), path "
                         f"separators, control characters or any of <>:\"|?*; got {name!r}, which contains {bad}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"adapter name {name!r} is not valid Unicode text") from None
    if size > MAX_NAME_BYTES:
        raise ValueError(f"adapter name {name[:20]!r}... is {size} bytes long; names become folder names, "
                         f"at most {MAX_NAME_BYTES} bytes")
    if name.lower() in _RESERVED or name != name.strip():
        raise ValueError(f"adapter name {name!r} cannot be a folder name on every system (a reserved device name, "
                         "or leading/trailing spaces)")
    if hasattr(_MODULE_DICT, name):
        raise ValueError(f"adapter name {name!r} is an attribute of torch's ModuleDict, which holds the adapters")


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's GPT-2 style ``Conv1D`` (weight stored as (in, out))."""
    transformers = sys.modules.get("transformers.pytorch_utils")
    return transformers is not None and isinstance(module, transformers.Conv1D)


def is_adaptable(module: nn.Module) -> bool:
    """Whether LoRALinear can wrap ``module``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


class LoRAAdapter(nn.Module):
    """One adapter of a LoRALinear: ``lora_A`` ``(r * enabled, in)``, ``lora_B`` ``(out / groups * enabled, r)``
    and its hyper-parameters; with ``use_dora``, DoRA's magnitude ``lora_magnitude_vector`` (one per adapted output
    feature). With ``slices`` only the enabled output groups are adapted; the others' update is exactly zero by
    construction."""

    def __init__(self, base_weight: Tensor, r: int, alpha: float, dropout: float, use_rslora: bool, init: str,
                 slices: Sequence[bool] | None, use_dora: bool = False) -> None:
        super().__init__()
        out_features, in_features = base_weight.shape
        if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
            raise ValueError(f"r must be an integer >= 1, got {r!r}")
        if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if slices is not None:
            slices = [bool(s) for s in slices]
            if not any(slices) or out_features % len(slices):
                raise ValueError(f"slices {slices} must enable at least one of groups that divide "
                                 f"out_features={out_features}")
        enabled = sum(slices) if slices else 1
        rows = out_features // len(slices) * enabled if slices else out_features
        self.r, self.alpha, self.dropout, self.use_rslora, self.slices = r, float(alpha), float(dropout), use_rslora, \
            slices
        self.use_dora = bool(use_dora)
        self.scale = lora_scale(r, alpha, use_rslora)
        # fp32 over a 16-bit base layer (as peft): optimizer updates keep their precision; the op computes in
        # the layer's dtype.
        dtype = torch.float32 if base_weight.dtype in (torch.float16, torch.bfloat16) else base_weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r * enabled, in_features, dtype=dtype, device=base_weight.device))
        self.lora_B = nn.Parameter(torch.zeros(rows, r, dtype=dtype, device=base_weight.device))
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(rows, dtype=dtype, device=base_weight.device))
        self.reset_parameters(init, base_weight)

    def reset_parameters(self, init: str = "default", base_weight: Tensor | None = None) -> None:
        """A: kaiming-uniform (``"default"``, as nn.Linear) or normal with std 1/r; B: zeros; DoRA's magnitude:
        the norms of ``base_weight``'s adapted rows (B is zero), so that the layer's output does not change."""
        with torch.no_grad():
            for a in self.lora_A.split(self.r):  # each slice's A initialised as its own matrix
                if init == "gaussian":
                    nn.init.normal_(a, std=1.0 / self.r)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B.zero_()
            if self.use_dora:
                if base_weight is None:
                    raise ValueError("a DoRA adapter resets with the base weight: its magnitude starts at its norms")
                self.lora_magnitude_vector.copy_(enabled_rows(self.norms(base_weight), self.slices))

    @property
    def magnitude(self) -> Tensor | None:
        """DoRA's magnitude, or None for a LoRA adapter."""
        return self._parameters["lora_magnitude_vector"] if self.use_dora else None

    def norms(self, base_weight: Tensor) -> Tensor:
        """``|W_i + scale B_i A|`` for every output feature of ``base_weight`` ``(out, in)`` (fp32, detached)."""
        with torch.no_grad():
            return dora_norm(base_weight, self.lora_A, self.full_B(base_weight.shape[0]), self.scale)

    def full_B(self, out_features: int) -> Tensor:
        """B as ``(out, r * enabled)``: block-structured with zero rows for disabled slices."""
        return expand_slices(self.lora_B, self.slices, out_features) if self.slices is not None else self.lora_B

    def extra_repr(self) -> str:
        dora = ", use_dora=True" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, slices={self.slices}{dora}"


def _tensor(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>``: from its parameter dict when there, else as an attribute (a buffer, a parametrization)."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _active_adapters(attribute: str) -> property:
    """A read-only property of LoRALinear: the active adapter's ``attribute``."""
    return property(lambda self: getattr(self.adapter(), attribute), doc=f"The active adapter's {attribute}.")


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` computed by the fused op; the base layer is not copied.

    A layer holds named adapters (:meth:`add_adapter`, :meth:`delete_adapter`); the active one
    (:meth:`set_adapter`, None for the base alone) applies to every row, unless a mixed batch is set
    (:func:`fastlora.use_adapters`), where each row gets its own. ``lora_A``, ``lora_B``, ``r``, ``alpha``,
    ``scale``, ``dropout``, ``slices``, ``use_rslora`` and ``use_dora`` read the active adapter's. With
    ``use_dora``, the adapter is DoRA (weight-decomposed LoRA, as peft computes it).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default", slices: Sequence[bool] | None = None,
                 adapter_name: str = DEFAULT_ADAPTER, use_dora: bool = False) -> None:
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")
        self.base_layer = base
        self.conv1d = is_conv1d(base)  # its weight is stored (in, out): the op takes the transposed view
        self.in_features, self.out_features = self.base_weight().shape[1], self.base_weight().shape[0]
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.register_buffer("_premerge_weight", None, persistent=False)  # the exact base weight while merged
        self.register_buffer("_merged_factor", None, persistent=False)  # DoRA's m / n while merged inexactly
        self.mixed: tuple[AdapterRouting, list[str]] | None = None  # (routing, adapter names) of a mixed batch
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, init, slices, use_dora)
        self.active_adapter = adapter_name
        for p in base.parameters():
            p.requires_grad_(False)

    # -- adapters ---------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "default", slices: Sequence[bool] | None = None,
                    use_dora: bool = False) -> LoRAAdapter:
        """Add a new adapter (its B is zero, so the layer's output does not change); it does not become active."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if self.merged_adapter is not None and use_dora:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged into the base weight: unmerge it before "
                             "adding a DoRA adapter (its magnitude starts at the unmerged weight's norms)")
        adapter = LoRAAdapter(self.base_weight(), r, alpha, dropout, use_rslora, init, slices, use_dora)
        self.adapters[name] = adapter
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; if it was active, no adapter is active afterwards."""
        self.adapter(name)
        if self.merged_adapter == name:
            raise ValueError(f"adapter {name!r} is merged into the base weight: unmerge it first")
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter every row gets (None: the base layer alone)."""
        if name is not None:
            self.adapter(name)
        if self.merged_adapter is not None and name != self.merged_adapter:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged into the base weight: unmerge it before "
                             f"activating {name!r}")
        self.active_adapter = name

    def adapter(self, name: str | None = None) -> LoRAAdapter:
        """The adapter called ``name``, or the active one."""
        name = self.active_adapter if name is None else name
        if name is None:
            raise ValueError("no adapter is active on this layer")
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} on this layer (it has {list(self.adapters)})")
        return self.adapters[name]

    lora_A = _active_adapters("lora_A")
    lora_B = _active_adapters("lora_B")
    r = _active_adapters("r")
    alpha = _active_adapters("alpha")
    scale = _active_adapters("scale")
    dropout = _active_adapters("dropout")
    slices = _active_adapters("slices")
    use_rslora = _active_adapters("use_rslora")
    use_dora = _active_adapters("use_dora")

    # -- the base layer ---------------------------------------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        """The base layer's weight as stored (as peft's LoRA layers expose it): model code reads it, e.g. its dtype."""
        return _tensor(self._modules["base_layer"], "weight")

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias."""
        return _tensor(self._modules["base_layer"], "bias")

    def base_weight(self) -> Tensor:
        """The base weight as ``(out, in)``: a transposed view for Conv1D, never a copy."""
        weight = self.weight
        return weight.t() if self.conv1d else weight

    # -- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.mixed is not None:
            return self._forward_mixed(x)
        if self.merged_adapter is not None or self.active_adapter is None:
            return self.base_layer(x)
        # Submodules and parameters are read from their dicts: nn.Module's attribute fallback costs about a
        # microsecond per lookup, as much as the op's own Python at small shapes.
        a = self._modules["adapters"]._modules[self.active_adapter]
        return lora_linear(x, self.base_weight(), self.bias, _tensor(a, "lora_A"), _tensor(a, "lora_B"), a.scale,
                           a.dropout, self.training, slices=a.slices,
                           magnitude=_tensor(a, "lora_magnitude_vector") if a.use_dora else None)

    def _forward_mixed(self, x: Tensor) -> Tensor:
        if self.merged_adapter is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged into the base weight: unmerge it before "
                             "running a mixed batch")
        routing, names = self.mixed
        sequences = routing.ids.shape[0]
        if x.dim() < 2 or x.shape[0] != sequences:
            raise ValueError(f"use_adapters gave {sequences} adapter names but this layer's input {tuple(x.shape)} "
                             f"has {x.shape[0] if x.dim() >= 2 else 'no'} sequences (one name per row of the batch)")
        adapters = [self.adapters[n] for n in names]
        return lora_linear_mixed(x, self.base_weight(), self.bias, [_tensor(a, "lora_A") for a in adapters],
                                 [_tensor(a, "lora_B") for a in adapters], [a.scale for a in adapters],
                                 routing, [a.dropout for a in adapters], self.training,
                                 slices=[a.slices for a in adapters],
                                 magnitudes=[_tensor(a, "lora_magnitude_vector") if a.use_dora else None
                                             for a in adapters])

    def set_mixed(self, names: Sequence[str | None] | None, shared: dict | None = None) -> None:
        """Give row i of the batch the adapter ``names[i]`` (None, or a name this layer lacks: the base alone);
        None ends the mixed batch. Only the adapters the batch names are passed to the op. Layers given the same
        ``shared`` dict share one :class:`~fastlora.ops.routing.AdapterRouting` where their ids are equal, so that
        the rows are routed (grouped by adapter, moved to the device) once per batch for all of them."""
        if names is None:
            self.mixed = None
            return
        used = [n for n in dict.fromkeys(names) if n is not None and n in self.adapters]
        index = {n: i for i, n in enumerate(used)}
        ids = tuple(index.get(n, -1) for n in names)
        shared = {} if shared is None else shared
        key = (ids, len(used))
        if key not in shared:
            shared[key] = AdapterRouting(ids, len(used))
        self.mixed = shared[key], used

    # -- merging ----------------------------------------------------------------------------------------------

    def delta_weight(self, name: str | None = None) -> Tensor:
        """``scale * B @ A`` of an adapter (default: the active one) as ``(out, in)``, in float32 or wider."""
        a = self.adapter(name)
        compute = torch.promote_types(a.lora_A.dtype, torch.float32)
        return (a.full_B(self.out_features).to(compute) @ a.lora_A.to(compute)) * a.scale

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    @torch.no_grad()
    def merge(self, exact: bool = True) -> None:
        """Fold the active adapter into the base weight; forward is then exactly the base layer's. A DoRA adapter
        folds as peft folds it: ``W <- (m / n) (W + scale B A)``, n from the unmerged weight.

        ``exact``: keep a copy of the base weight (one more weight of the layer's dtype, on its device, until
        :meth:`unmerge`), so that unmerging restores it bit for bit. ``exact=False`` keeps nothing (but DoRA's
        factor m / n, one value per output feature), and unmerging undoes the update arithmetically, leaving
        rounding changes in the base weight (most in fp16/bf16).
        """
        if self.merged_adapter is None and self.active_adapter is not None:
            a = self.adapter()
            weight = self.base_weight()
            backup = self.base_layer.weight.detach().clone() if exact else None
            delta = self.delta_weight()
            merged = weight.to(delta.dtype) + delta
            if a.use_dora:
                factor = dora_factor(a.norms(weight), a.magnitude.detach(), a.slices)
                merged = merged * factor[:, None].to(merged.dtype)
                self._merged_factor = None if exact else factor
            weight.copy_(merged.to(weight.dtype))
            self._premerge_weight = backup
            self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapter back out of the base weight: bit for bit after ``merge(exact=True)``, to within
        rounding after ``merge(exact=False)``."""
        if self.merged_adapter is not None:
            if self._premerge_weight is not None:
                self.base_layer.weight.copy_(self._premerge_weight)
            else:
                weight, delta = self.base_weight(), self.delta_weight(self.merged_adapter)
                merged = weight.to(delta.dtype)
                if self._merged_factor is not None:
                    merged = merged / self._merged_factor[:, None].to(merged.dtype)
                weight.copy_((merged - delta).to(weight.dtype))
            self._premerge_weight = self._merged_factor = None
            self.merged_adapter = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, active={self.active_adapter!r}, "
                f"merged={self.merged_adapter!r}")
