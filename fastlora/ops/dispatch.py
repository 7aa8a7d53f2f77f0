"""Backends: the contract each one meets, which one runs a call, which are available, and why not.

A backend is a module (``fastlora.ops.reference``, ``.cpu``, ``.triton``) that provides what :class:`Backend`
lists; one that cannot work here raises ``ImportError`` (with the reason) on import. Dispatch asks each backend
which devices and dtypes it takes, never probes for optional functions.

Default choice: CUDA tensors go to ``triton``, CPU tensors to ``cpu``, where that backend is available and takes
the dtype; everything else to ``reference`` (fp64 anywhere, fp16/bf16 on CPU). ``FASTLORA_BACKEND`` forces one, and
a forced backend that is unavailable or cannot take the tensors is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from fastlora.ops.routing import Rows

BACKEND_NAMES = ("reference", "cpu", "triton")
PREFERRED = {"cuda": "triton", "cpu": "cpu"}  # device type -> the backend tried first
ENV_VAR = "FASTLORA_BACKEND"
Slices = tuple[bool, ...] | None
Needs = tuple[bool, bool, bool]  # (dx, dA, dB) wanted
DoraNeeds = tuple[bool, bool, bool, bool]  # (dx, dA, dB, dm) wanted


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides. Every function takes 2-D x (rows, in) that the op has checked
    (:mod:`fastlora.ops.args`), W ``(out, in)`` (any strides), and computes in x's dtype with fp32 accumulation;
    LoRA parameters are in x's dtype or fp32 over a 16-bit x, and their gradients come back in their own dtype."""

    NAME: str
    DEVICES: frozenset[str] | None  # the device types it takes (None: any)
    DTYPES: frozenset[torch.dtype]  # the dtypes of x it takes
    CHECKS_ARGUMENTS: bool  # forward checks every argument itself before computing (inference skips the op's checks)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
                dropout_p: float, seed: Tensor, slices: Slices, needs: Needs | None) -> tuple[Tensor, tuple]:
        """``(out, saved)``: ``x W^T + b + scale dropout(x) A^T B^T`` and what backward takes as ``saved`` for the
        gradients ``needs`` asks for (None: inference, nothing saved)."""

    def backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                 dropout_p: float, seed: Tensor, needs: Needs, slices: Slices, saved: tuple
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dA, dB)``, each only when ``needs`` asks for it; ``saved``: forward's, or () to prepare anew."""

    def dora_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                     magnitude: Tensor, scale: float, dropout_p: float, seed: Tensor, slices: Slices,
                     needs: DoraNeeds | None) -> tuple[Tensor, tuple]:
        """``(out, saved)`` of DoRA (see :func:`fastlora.ops.reference.dora_forward` for the semantics)."""

    def dora_backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                      magnitude: Tensor, scale: float, dropout_p: float, seed: Tensor, needs: DoraNeeds,
                      slices: Slices, saved: tuple
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(dx, dA, dB, dm)``, each only when ``needs`` asks for it; ``saved``: dora_forward's, or () for anew."""

    def forward_mixed(self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_As: list[Tensor],
                      lora_Bs: list[Tensor], scales: list[float], dropout_ps: list[float], rows: Rows,
                      seed: Tensor) -> Tensor:
        """Row i gets ``x_i W^T + b`` plus its adapter's update (``rows``: the batch's routing; B's dense)."""

    def backward_mixed(self, grad_out: Tensor, x: Tensor, weight: Tensor, lora_As: list[Tensor],
                       lora_Bs: list[Tensor], scales: list[float], dropout_ps: list[float], rows: Rows, seed: Tensor,
                       need_dx: bool, need_lora: list[bool]
                       ) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
        """``(dx, dAs, dBs)``: each adapter's gradients from its own rows; None where ``need_lora`` is False."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and if not, why."""

    name: str
    available: bool
    reason: str = ""


@functools.cache
def load(name: str) -> Backend | str:
    """The backend's module, or the reason it is unavailable."""
    try:
        module = importlib.import_module(f"fastlora.ops.{name}")
    except ImportError as error:
        return str(error) or type(error).__name__
    except Exception as error:  # e.g. a stale extension build missing a function: unavailable, not fatal
        return f"failed to load: {type(error).__name__}: {error}"
    if not isinstance(module, Backend):
        missing = [m for m in Backend.__protocol_attrs__ if not hasattr(module, m)] \
            if hasattr(Backend, "__protocol_attrs__") else []
        return f"fastlora.ops.{name} does not provide the backend contract (missing {missing})"
    return module


def backends() -> dict[str, BackendStatus]:
    """Every backend's availability on this machine, with the reason when unavailable."""
    statuses = {}
    for name in BACKEND_NAMES:
        loaded = load(name)
        ok = isinstance(loaded, ModuleType)
        statuses[name] = BackendStatus(name, ok, "" if ok else loaded)
    return statuses


def refusal(backend: Backend, device: torch.device, dtype: torch.dtype) -> str:
    """Why ``backend`` cannot take tensors of this device and dtype ("" if it can)."""
    if (backend.DEVICES is None or device.type in backend.DEVICES) and dtype in backend.DTYPES:
        return ""
    devices = "any device" if backend.DEVICES is None else " or ".join(sorted(backend.DEVICES))
    dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in backend.DTYPES))
    return f"the {backend.NAME} backend takes {dtypes} tensors on {devices}, got {dtype} on {device}"


def forced_backend() -> str | None:
    """The backend named by ``FASTLORA_BACKEND``, validated, or None."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKEND_NAMES:
        raise ValueError(f"{ENV_VAR}={name!r} is not one of {', '.join(BACKEND_NAMES)}")
    return name


try:  # the environment's own dict: a lookup there costs ~0.1 us, os.environ.get's encoding ~2 us, on every call
    _ENV_DATA, _ENV_KEY, _INTERPRET_KEY = os.environ._data, os.environ.encodekey(ENV_VAR), \
        os.environ.encodekey("TRITON_INTERPRET")
except AttributeError:  # a Python without them
    _ENV_DATA, _ENV_KEY, _INTERPRET_KEY = os.environ, ENV_VAR, "TRITON_INTERPRET"
_CHOSEN: dict[tuple, Backend] = {}


def select(x: Tensor) -> Backend:
    """The backend that runs a call on tensors like ``x``: chosen once per ``FASTLORA_BACKEND`` value,
    ``TRITON_INTERPRET`` value, device and dtype, then kept (an error is raised on every call, never kept)."""
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
    key = (_ENV_DATA.get(_ENV_KEY), _ENV_DATA.get(_INTERPRET_KEY), device_type, x.dtype)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _choose(x.device, x.dtype)
    return chosen


def _choose(device: torch.device, dtype: torch.dtype) -> Backend:
    name = forced_backend()
    if name is None:
        preferred = load(PREFERRED.get(device.type, "reference"))
        if isinstance(preferred, ModuleType) and not refusal(preferred, device, dtype):
            return preferred
        name = "reference"
    loaded = load(name)
    if not isinstance(loaded, ModuleType):
        raise RuntimeError(f"{ENV_VAR}={name} but the {name} backend is unavailable: {loaded}")
    why_not = refusal(loaded, device, dtype)
    if why_not:
        raise RuntimeError(f"{ENV_VAR}={name}: {why_not}" if forced_backend() else why_not)
    return loaded
