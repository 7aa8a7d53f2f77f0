"""Every way the benchmarks compute a LoRA layer, and a LoRA GPT-2, each defined once and built from a spec.

A layer contender is built from :class:`Tensors` (made from a :class:`Spec`: rows, in, out, rank, dropout,
dtype, device, slices...) that every contender of a case shares, and computes
``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` (or, for ``F.linear``, ``nn.Linear`` and ``merged``, the floors it is
measured against). Adding one is one entry in :data:`CONTENDERS`; a builder's keyword options go to the
library it wraps, so a variant is ``functools.partial`` of an existing builder, e.g. peft's DoRA::

    Contender("peft dora", partial(peft_layer, use_dora=True), needs="peft")

A model contender (:data:`MODELS`) adds LoRA to a Hugging Face GPT-2 as the LoRA paper did: r=4, alpha 32,
dropout 0.1 on q and v of every ``c_attn`` (fastlora's and peft's also as DoRA).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastlora

MODES = ("forward", "backward")
BACKEND_ENV = "FASTLORA_BACKEND"


@dataclass(frozen=True)
class Spec:
    """One LoRA layer: x ``(rows, in)``, W ``(out, in)``, an adapter of rank ``rank`` scaled by ``scale``."""

    rows: int
    in_features: int
    out_features: int
    rank: int
    dropout: float = 0.0
    dtype: str = "float32"
    device: str = "cpu"
    lora_dtype: str | None = None  # the adapter's own dtype (peft keeps fp32 adapters over a bf16 layer)
    slices: tuple[bool, ...] | None = None  # LoRA on some equal output groups only (GPT-2's q,v of c_attn)
    conv1d: bool = False  # W stored (in, out) as GPT-2's Conv1D, used through its transposed view
    scale: float = 2.0

    @property
    def label(self) -> str:
        parts = [f"{self.in_features}->{self.out_features}", f"M={self.rows}", f"r={self.rank}",
                 f"p={self.dropout:g}", self.dtype]
        if self.lora_dtype:
            parts.append(f"lora {self.lora_dtype}")
        if self.slices:
            parts.append("slices " + "".join("1" if s else "0" for s in self.slices))
        if self.conv1d:
            parts.append("conv1d")
        return " ".join(parts)

    def params(self) -> dict:
        return asdict(self)


@dataclass
class Tensors:
    """The tensors every contender of a case shares: x (rotated copies on a GPU), dy, W, b, A and B."""

    spec: Spec
    xs: list[Tensor]
    grads: list[Tensor]
    weight: Tensor
    bias: Tensor
    lora_A: Tensor
    lora_B: Tensor

    @property
    def x(self) -> Tensor:
        return self.xs[0]


def _rotation_copies(spec: Spec, bytes_per_call: int) -> int:
    """How many input copies to cycle through so that each call misses L2 (1 on a CPU)."""
    if spec.device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(16, math.ceil(2 * l2 / max(bytes_per_call, 1))))


def make_tensors(spec: Spec, backward: bool = True, seed: int = 0) -> Tensors:
    """Fresh random (never zero) tensors for ``spec``; x, A and B require grad (as in training; a forward-only
    benchmark runs them under ``torch.no_grad()``), and ``backward`` adds a dy per copy of x."""
    torch.manual_seed(seed)
    dtype, device = getattr(torch, spec.dtype), torch.device(spec.device)
    lora_dtype = getattr(torch, spec.lora_dtype or spec.dtype)

    def randn(*shape: int, std: float = 1.0, as_dtype: torch.dtype = dtype) -> Tensor:
        return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(as_dtype)

    n_in, n_out, m, r = spec.in_features, spec.out_features, spec.rows, spec.rank
    groups, enabled = (len(spec.slices), sum(spec.slices)) if spec.slices else (1, 1)
    per_call = (m * n_in + (m * n_out if backward else 0)) * torch.finfo(dtype).bits // 8
    copies = _rotation_copies(spec, per_call)
    weight = randn(n_in, n_out, std=n_in**-0.5).t() if spec.conv1d else randn(n_out, n_in, std=n_in**-0.5)
    return Tensors(
        spec=spec,
        xs=[randn(m, n_in).requires_grad_() for _ in range(copies)],
        grads=[randn(m, n_out) for _ in range(copies)] if backward else [],
        weight=weight,
        bias=randn(n_out, std=0.1),
        lora_A=randn(r * enabled, n_in, std=n_in**-0.5, as_dtype=lora_dtype).requires_grad_(),
        lora_B=randn(n_out // groups * enabled, r, std=r**-0.5, as_dtype=lora_dtype).requires_grad_(),
    )


@dataclass
class Built:
    """A contender ready to run: ``fn(x) -> y``, the tensors besides x whose grads a backward sets, its module."""

    fn: Callable[[Tensor], Tensor]
    grads: list[Tensor] = field(default_factory=list)
    module: nn.Module | None = None


# ---------------------------------------------------------------- the computations


def unfused_lora(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 scale: float, dropout: float) -> Tensor:
    """peft's eager computation: ``F.linear(x, W, b) + lora_B(lora_A(dropout(x))) * s``."""
    x_lora = F.dropout(x, dropout, training=True) if dropout > 0 else x
    return F.linear(x, weight, bias) + F.linear(F.linear(x_lora, lora_A), lora_B) * scale


def f_linear(t: Tensors) -> Built:
    """The base layer alone, ``F.linear(x, W, b)``: the floor a fused LoRA layer aims at."""
    w, b = t.weight, t.bias
    return Built(lambda x: F.linear(x, w, b))


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


def _trainable(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True)


def base_linear(t: Tensors) -> nn.Linear:
    """A frozen ``nn.Linear`` holding the case's W and b (not copies)."""
    linear = nn.Linear(t.spec.in_features, t.spec.out_features, device="meta")
    linear.weight, linear.bias = _frozen(t.weight), _frozen(t.bias)
    return linear


def nn_linear(t: Tensors) -> Built:
    """The base layer called as a module: what a LoRA layer replaces in a model."""
    linear = base_linear(t)
    return Built(lambda x: linear(x), module=linear)


def unfused(t: Tensors) -> Built:
    """:func:`unfused_lora`; adapters in another dtype (fp32 over a bf16 layer) are cast to x's in every call."""
    w, b, A, B, s, p = t.weight, t.bias, t.lora_A, t.lora_B, t.spec.scale, t.spec.dropout
    if A.dtype != t.x.dtype:
        return Built(lambda x: unfused_lora(x, w, b, A.to(x.dtype), B.to(x.dtype), s, p), [A, B])
    return Built(lambda x: unfused_lora(x, w, b, A, B, s, p), [A, B])


_compiled_unfused: Callable[..., Tensor] | None = None


def unfused_compiled(t: Tensors) -> Built:
    """:func:`unfused_lora` under ``torch.compile`` (inductor), one compile shared by all cases."""
    global _compiled_unfused
    if _compiled_unfused is None:
        # grad mode, dropout on/off and x needing grad each make a variant: a grid needs more than dynamo's
        # default limit of 8, past which it would silently run the function eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
        _compiled_unfused = torch.compile(unfused_lora)
    fn, w, b, A, B, s, p = _compiled_unfused, t.weight, t.bias, t.lora_A, t.lora_B, t.spec.scale, t.spec.dropout
    return Built(lambda x: fn(x, w, b, A, B, s, p), [A, B])


def merged(t: Tensors) -> Built:
    """``F.linear`` with ``W + s·B·A`` folded in: the inference floor (forward only)."""
    delta = (t.lora_B.detach().double() @ t.lora_A.detach().double()) * t.spec.scale
    w, b = (t.weight.double() + delta).to(t.weight.dtype), t.bias
    return Built(lambda x: F.linear(x, w, b))


def op(t: Tensors) -> Built:
    """:func:`fastlora.lora_linear` on the case's tensors."""
    w, b, A, B, s, p = t.weight, t.bias, t.lora_A, t.lora_B, t.spec.scale, t.spec.dropout
    if t.spec.slices:
        slices = list(t.spec.slices)
        return Built(lambda x: fastlora.lora_linear(x, w, b, A, B, s, p, slices=slices), [A, B])
    return Built(lambda x: fastlora.lora_linear(x, w, b, A, B, s, p), [A, B])


def lora_layer(t: Tensors, **options) -> Built:
    """A :class:`fastlora.LoRALinear` over the case's ``nn.Linear``, its adapter set to the case's A and B."""
    spec = t.spec
    layer = fastlora.LoRALinear(base_linear(t), r=spec.rank, alpha=spec.scale * spec.rank, dropout=spec.dropout,
                                slices=list(spec.slices) if spec.slices else None, **options)
    with torch.no_grad():
        layer.lora_A.copy_(t.lora_A)
        layer.lora_B.copy_(t.lora_B)
    return Built(lambda x: layer(x), [layer.lora_A, layer.lora_B], layer)


def peft_linear(base: nn.Linear, adapters: dict[str, tuple[Tensor, Tensor]], scale: float, dropout: float,
                **options) -> nn.Module:
    """peft's ``lora.Linear`` over ``base`` with the named adapters' A and B (trainable copies), in train mode.
    ``options`` go to peft's ``LoraConfig``."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.proj = base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft's warning that a second adapter makes several
        for name, (A, _) in adapters.items():
            config = LoraConfig(r=A.shape[0], lora_alpha=scale * A.shape[0], lora_dropout=dropout,
                                target_modules=["proj"], **options)
            inject_adapter_in_model(config, holder, adapter_name=name)
    layer = holder.proj
    for name, (A, B) in adapters.items():
        layer.lora_A[name].weight = _trainable(A)
        layer.lora_B[name].weight = _trainable(B)
        layer.scaling[name] = scale
    return layer.train()


def peft_layer(t: Tensors, **options) -> Built:
    """peft's ``lora.Linear`` (the layer peft users run) over the case's ``nn.Linear``."""
    layer = peft_linear(base_linear(t), {"default": (t.lora_A, t.lora_B)}, t.spec.scale, t.spec.dropout, **options)
    return Built(lambda x: layer(x), list(layer.parameters()), layer)


def peft_accelerated(t: Tensors) -> Built:
    """peft's layer made to compute through fastlora's op by :func:`fastlora.accelerate`."""
    built = peft_layer(t)
    fastlora.accelerate(built.module, strict=True)
    return built


def loralib_layer(t: Tensors) -> Built:
    """``loralib.Linear`` (the LoRA paper's own layer) holding the case's W, b, A and B."""
    import loralib

    spec = t.spec
    layer = loralib.Linear(spec.in_features, spec.out_features, r=spec.rank, lora_alpha=spec.scale * spec.rank,
                           lora_dropout=spec.dropout, merge_weights=False, device="meta")
    layer.weight, layer.bias = _frozen(t.weight), _frozen(t.bias)
    layer.lora_A, layer.lora_B = _trainable(t.lora_A), _trainable(t.lora_B)
    layer.scaling = spec.scale
    return Built(lambda x: layer(x), list(layer.parameters()), layer.train())


# ---------------------------------------------------------------- the registry


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """``FASTLORA_BACKEND=name`` inside the block (unchanged for None)."""
    previous = os.environ.get(BACKEND_ENV)
    if name is not None:
        os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = previous


_BACKEND_DEVICE = {"cpu": "cpu", "triton": "cuda"}  # the reference backend runs anywhere


@dataclass(frozen=True)
class Contender:
    """A named way to compute the layer; ``backend`` forces a fastlora backend while it runs."""

    name: str
    build: Callable[[Tensors], Built]
    backend: str | None = None
    modes: tuple[str, ...] = MODES
    needs: str | None = None  # a package it imports
    slices: bool = False  # whether it can adapt some output groups only
    check: Callable[[Spec], str] | None = None  # any other reason it cannot run a spec ("" if none)

    def active(self) -> contextlib.AbstractContextManager:
        """Force this contender's backend (if any) for the duration of the block."""
        return forced_backend(self.backend)

    def unavailable(self, spec: Spec) -> str:
        """Why this contender cannot run ``spec`` ("" if it can)."""
        if spec.slices and not self.slices:
            return "computes no sliced adapter"
        if self.needs:
            try:
                __import__(self.needs)
            except ImportError as error:
                return f"{self.needs} not installed ({error})"
        if self.backend is not None:
            status = fastlora.backends()[self.backend]
            home = _BACKEND_DEVICE.get(self.backend, spec.device)
            if not status.available:
                return status.reason
            if home != spec.device:
                return f"runs on {home}, this case is on {spec.device}"
        return self.check(spec) if self.check else ""


def _compiler(spec: Spec) -> str:
    if spec.device == "cpu" and not any(shutil.which(cc) for cc in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        return "torch.compile on a CPU needs a C++ compiler and none was found"
    return ""


CONTENDERS = [
    Contender("F.linear", f_linear),
    Contender("nn.Linear", nn_linear),
    Contender("unfused", unfused),
    Contender("unfused compiled", unfused_compiled, check=_compiler),
    Contender("merged", merged, modes=("forward",)),
    Contender("peft", peft_layer, needs="peft"),
    Contender("peft+accelerate", peft_accelerated, needs="peft"),
    Contender("loralib", loralib_layer, needs="loralib"),
    *(Contender(f"{backend} op", op, backend=backend, slices=True) for backend in fastlora.backends()),
    *(Contender(f"{backend} layer", lora_layer, backend=backend, slices=True) for backend in fastlora.backends()),
]
BY_NAME = {c.name: c for c in CONTENDERS}


def pick(spec: Spec, names: list[str] | tuple[str, ...] | None = None) -> tuple[list[Contender], dict[str, str]]:
    """The contenders named (every one if None, in the registry's order) that can run ``spec``, in the order
    named, and the reason for each one that cannot."""
    chosen = [BY_NAME[name] for name in names] if names is not None else CONTENDERS
    ready, missing = [], {}
    for contender in chosen:
        reason = contender.unavailable(spec)
        if reason:
            missing[contender.name] = reason
        else:
            ready.append(contender)
    return ready, missing


# ---------------------------------------------------------------- whole models: LoRA on GPT-2's q and v

RANK, ALPHA, DROPOUT = 4, 32, 0.1
QV = [True, False, True]  # c_attn's output is q, k, v


def gpt2_floor(model: nn.Module, dropout: float = DROPOUT) -> nn.Module:
    """No adapter, every weight frozen: what a step costs if the LoRA layers were free."""
    return model.requires_grad_(False)


def gpt2_fastlora(model: nn.Module, dropout: float = DROPOUT, **options) -> nn.Module:
    """:func:`fastlora.inject` with ``slices={"c_attn": [True, False, True]}``: q and v only. ``options`` go to
    :class:`fastlora.LoraConfig`."""
    config = fastlora.LoraConfig(r=RANK, alpha=ALPHA, dropout=dropout, target_modules=["c_attn"],
                                 slices={"c_attn": QV}, **options)
    return fastlora.inject(model, config)


def gpt2_peft(model: nn.Module, dropout: float = DROPOUT, **options) -> nn.Module:
    """peft on ``c_attn``: peft cannot adapt part of a fused projection, so it adapts q, k and v with one A and B
    of rank 4 over the whole output (as peft users run GPT-2). ``options`` go to peft's ``LoraConfig``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["c_attn"],
                        fan_in_fan_out=True, **options)
    return get_peft_model(model, config)


def gpt2_peft_accelerated(model: nn.Module, dropout: float = DROPOUT) -> nn.Module:
    """The peft model, its LoRA layers computed by fastlora's op through :func:`fastlora.accelerate`."""
    model = gpt2_peft(model, dropout)
    fastlora.accelerate(model, strict=True)
    return model


def gpt2_loralib(model: nn.Module, dropout: float = DROPOUT) -> nn.Module:
    """Each ``c_attn`` replaced by ``loralib.MergedLinear(enable_lora=[True, False, True])``, loralib's q,v layer."""
    import loralib

    for block in model.transformer.h:
        conv = block.attn.c_attn  # transformers Conv1D: weight (in, out)
        n_in, n_out = conv.weight.shape
        layer = loralib.MergedLinear(n_in, n_out, r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, enable_lora=QV,
                                     fan_in_fan_out=True, merge_weights=False, device=conv.weight.device)
        layer.weight.data.copy_(conv.weight.data)
        layer.bias.data.copy_(conv.bias.data)
        block.attn.c_attn = layer
    loralib.mark_only_lora_as_trainable(model)
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "floor": gpt2_floor, "fastlora": gpt2_fastlora, "peft": gpt2_peft, "peft+accelerate": gpt2_peft_accelerated,
    "loralib": gpt2_loralib, "fastlora dora": partial(gpt2_fastlora, use_dora=True),
    "peft dora": partial(gpt2_peft, use_dora=True)}
