"""The cpu backend: fp32 LoRA forward and backward in the C++ extension ``fastlora._C``.

The extension computes the base product with OpenBLAS (from the ``scipy-openblas32`` wheel)
and fuses bias, dropout and the rank-R update around it; it runs on torch's thread count.
Importing this module raises ImportError, with the reason, when the extension is missing.
``FASTLORA_CPU_ISA=portable|avx2|avx512`` (or :func:`set_isa`) overrides the instruction set
that CPUID picked for its kernels.
"""

from __future__ import annotations

import ctypes
import importlib
import os

import torch
from torch import Tensor

from fastlora.ops.reference import dropout_threshold

ISA_ENV_VAR = "FASTLORA_CPU_ISA"


def _load_extension():
    """``fastlora._C``, after loading the OpenBLAS it links (so editable installs find it too)."""
    try:
        import scipy_openblas32
    except ImportError as error:
        raise ImportError(f"the cpu backend needs the scipy-openblas32 package: {error}") from error
    ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True)))
    try:
        return importlib.import_module("fastlora._C")
    except ImportError as error:
        raise ImportError(
            f"fastlora._C, the C++ extension, is not built or does not load ({error}); reinstall "
            "fastlora with a C++ compiler present (FASTLORA_BUILD_EXT=1 makes a failed build an error)"
        ) from error


_C = _load_extension()
if os.environ.get(ISA_ENV_VAR):
    _C.set_isa(os.environ[ISA_ENV_VAR].strip().lower())


def isa() -> str:
    """The instruction set the kernels use: ``portable``, ``avx2`` or ``avx512``."""
    return _C.isa()


def supported_isas() -> list[str]:
    """The instruction sets this CPU and build support, narrowest first."""
    return _C.supported_isas()


def set_isa(name: str) -> None:
    """Run the kernels with this instruction set (one of :func:`supported_isas`)."""
    _C.set_isa(name)


def _rows_unit_stride(x: Tensor) -> Tensor:
    """x itself if its rows are unit-stride, else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _weight_view(weight: Tensor) -> Tensor:
    """weight itself if row- or column-major (as a Conv1D weight's transpose is), else a copy."""
    if weight.stride(1) == 1 or weight.stride(0) == 1:
        return weight
    return weight.contiguous()


def _np(t: Tensor):
    return t.detach().numpy()


def _seed(seed: Tensor) -> int:
    return int(seed.item())


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
            scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    """``(M, out)`` output, computed by :func:`fastlora._C.forward`."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    _C.forward(_np(out), _np(_rows_unit_stride(x)), _np(_weight_view(weight)),
               None if bias is None else _np(bias.contiguous()), _np(lora_A.contiguous()),
               _np(lora_B.contiguous()), scale, dropout_p, dropout_threshold(dropout_p), _seed(seed),
               torch.get_num_threads())
    return out


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             scale: float, dropout_p: float, seed: Tensor,
             needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)``, each computed only when ``needs`` asks for it, by :func:`fastlora._C.backward`."""
    need_dx, need_dA, need_dB = needs
    dx = torch.empty(x.shape, dtype=x.dtype) if need_dx else None
    dA = torch.empty(lora_A.shape, dtype=x.dtype) if need_dA else None
    dB = torch.empty(lora_B.shape, dtype=x.dtype) if need_dB else None
    _C.backward(*(None if g is None else _np(g) for g in (dx, dA, dB)), _np(_rows_unit_stride(grad_out)),
                _np(_rows_unit_stride(x)), _np(_weight_view(weight)), _np(lora_A.contiguous()),
                _np(lora_B.contiguous()), scale, dropout_p, dropout_threshold(dropout_p), _seed(seed),
                torch.get_num_threads())
    return dx, dA, dB
