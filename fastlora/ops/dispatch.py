"""Backend selection: which backend runs a call, which are available, and why not.

A backend is a module with two functions of the same signature as
:func:`fastlora.ops.reference.forward` and :func:`fastlora.ops.reference.backward`, on 2-D
inputs. A backend that cannot work here raises ``ImportError`` (with the reason) on import.

Default choice: CUDA tensors go to ``triton``; fp32 CPU tensors to ``cpu``; everything else
(and any backend that failed to import) to ``reference``. ``FASTLORA_BACKEND`` forces one,
and a forced backend that is unavailable or cannot take the tensors is an error, never a
silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

BACKEND_NAMES = ("reference", "cpu", "triton")
ENV_VAR = "FASTLORA_BACKEND"


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and if not, why."""

    name: str
    available: bool
    reason: str = ""


@functools.cache
def _load(name: str) -> ModuleType | str:
    """The backend's module, or the reason it is unavailable."""
    try:
        return importlib.import_module(f"fastlora.ops.{name}")
    except ImportError as error:
        return str(error) or type(error).__name__
    except Exception as error:  # e.g. a stale extension build missing a function: unavailable, not fatal
        return f"failed to load: {type(error).__name__}: {error}"


def backends() -> dict[str, BackendStatus]:
    """Every backend's availability on this machine, with the reason when unavailable."""
    statuses = {}
    for name in BACKEND_NAMES:
        loaded = _load(name)
        ok = isinstance(loaded, ModuleType)
        statuses[name] = BackendStatus(name, ok, "" if ok else loaded)
    return statuses


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _accepts(name: str, x: torch.Tensor) -> str:
    """Why backend ``name`` cannot take tensors like ``x`` ("" if it can)."""
    if name == "cpu" and (x.device.type != "cpu" or x.dtype != torch.float32):
        return f"the cpu backend takes float32 CPU tensors, got {x.dtype} on {x.device}"
    if name == "triton" and x.device.type != "cuda" and not _interpreting_triton():
        return f"the triton backend takes CUDA tensors (or TRITON_INTERPRET=1), got {x.device}"
    return ""


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


def select(x: torch.Tensor) -> ModuleType:
    """The backend module that runs a call on tensors like ``x``: chosen once per ``FASTLORA_BACKEND`` value,
    ``TRITON_INTERPRET`` value, device kind and dtype, then cached (an error is raised on every call, never cached)."""
    key = (_ENV_DATA.get(_ENV_KEY), _ENV_DATA.get(_INTERPRET_KEY), x.is_cuda, x.is_cpu, x.dtype)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _choose(x)
    return chosen


_CHOSEN: dict[tuple, ModuleType] = {}


def _choose(x: torch.Tensor) -> ModuleType:
    name = forced_backend()
    if name is None:
        return _automatic(x)
    loaded = _load(name)
    if not isinstance(loaded, ModuleType):
        raise RuntimeError(f"{ENV_VAR}={name} but the {name} backend is unavailable: {loaded}")
    why_not = _accepts(name, x)
    if why_not:
        raise RuntimeError(f"{ENV_VAR}={name}: {why_not}")
    return loaded


def _automatic(x: torch.Tensor) -> ModuleType:
    preferred = "triton" if x.device.type == "cuda" else "cpu"
    loaded = _load(preferred)
    if isinstance(loaded, ModuleType) and not _accepts(preferred, x):
        return loaded
    return _load("reference")
