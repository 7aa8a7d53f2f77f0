"""The cpu backend: fp32 LoRA (and DoRA) forward and backward in the C++ extension ``fastlora._C``, for one
adapter and for mixed batches (each row its own adapter, see :mod:`fastlora.ops.mixed`).

The extension writes bias + dropout + rank-R update into the output (and dx's masked rank-R
term, dA and dB in one pass in backward); the base product ``x W^T`` (``dy W``) is accumulated
onto it by one of two GEMMs, see :func:`set_gemm`: PyTorch's own (``torch``, the default on
Intel CPUs when PyTorch has MKL, whose sgemm beats OpenBLAS's there) or OpenBLAS inside the
extension (``openblas``, from the ``scipy-openblas32`` wheel, the default otherwise: on AMD
Zen it outran PyTorch's MKL). Either way a
forward of at most 8 rows with a row-major (``nn.Linear``) weight streams W once through the
extension's own kernel, which beats both GEMMs there. It runs on torch's thread count.

DoRA runs whole in the extension, which calls the chosen GEMM itself (its per-feature factor scales the base
product, so the product cannot be added afterwards): the norms ``|W_i + s B_i A|`` from one pass over W on every
call, the factor applied in the tiles' epilogue, dx from dy's columns scaled a chunk at a time.

The tensors go to the extension as they are (it reads their data pointers, shapes and strides),
never through ``Tensor.numpy()``: that marks a tensor's storage non-resizable for good, and FSDP
frees the unsharded parameters it gathered by resizing their storage to zero.

Importing this module raises ImportError, with the reason, when the extension is missing.
``FASTLORA_CPU_ISA=portable|avx2|avx512`` (or :func:`set_isa`) overrides the instruction set
CPUID picked; ``FASTLORA_CPU_GEMM=torch|openblas`` (or :func:`set_gemm`) the GEMM.
"""

from __future__ import annotations

import ctypes
import importlib
import os

import torch
from torch import Tensor

from fastlora.ops.reference import expand_slices, stack_slices
from fastlora.ops.routing import Rows

NAME = "cpu"
DEVICES = frozenset({"cpu"})
DTYPES = frozenset({torch.float32})
CHECKS_ARGUMENTS = True  # the extension checks every argument before it computes
ISA_ENV_VAR = "FASTLORA_CPU_ISA"
GEMM_ENV_VAR = "FASTLORA_CPU_GEMM"
GEMMS = ("torch", "openblas")


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
_gemm = "torch" if torch.backends.mkl.is_available() and _C.cpu_vendor() == "intel" else "openblas"


def gemm() -> str:
    """Which GEMM computes the base product: ``torch`` or ``openblas``."""
    return _gemm


def set_gemm(name: str) -> None:
    """Compute the base product with PyTorch's GEMM (``torch``) or the extension's OpenBLAS."""
    global _gemm
    if name not in GEMMS:
        raise ValueError(f"unknown GEMM {name!r}: choose one of {', '.join(GEMMS)}")
    _gemm = name


if os.environ.get(GEMM_ENV_VAR):
    set_gemm(os.environ[GEMM_ENV_VAR].strip().lower())


def isa() -> str:
    """The instruction set the kernels use: ``portable``, ``avx2`` or ``avx512``."""
    return _C.isa()


def supported_isas() -> list[str]:
    """The instruction sets this CPU and build support, narrowest first."""
    return _C.supported_isas()


def set_isa(name: str) -> None:
    """Run the kernels with this instruction set (one of :func:`supported_isas`)."""
    _C.set_isa(name)


def _seed(seed: Tensor, dropout_p: float) -> int:
    """The seed as an int, or 0 when no dropout reads it (``dropout_p``: the largest of the call's)."""
    return int(seed.item()) if dropout_p > 0 else 0


# Each call is one call into the extension, which checks every argument, copies any whose layout its
# kernels do not take, makes the outputs and says whether it computed the base product: it always
# does with its OpenBLAS GEMM, and with PyTorch's only where its streaming kernel is faster (a
# forward of at most 8 rows over a row-major weight); else it is added here.


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
            scale: float, dropout_p: float, seed: Tensor, slices: tuple[bool, ...] | None = None,
            needs: tuple[bool, bool, bool] | None = None) -> tuple[Tensor, tuple]:
    """``((M, out) output, ())``: :func:`fastlora._C.forward`, then ``+= x W^T`` if torch does the GEMM. Slices
    run over the block-structured B (:func:`~fastlora.ops.reference.expand_slices`); backward needs nothing saved."""
    if slices is not None:
        lora_B = expand_slices(lora_B, slices, weight.shape[0])
    out, base_done = _C.forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, _seed(seed, dropout_p),
                                torch.get_num_threads(), _gemm == "openblas")
    if not base_done:
        out.addmm_(x.detach(), weight.detach().t())
    return out, ()


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
             scale: float, dropout_p: float, seed: Tensor, needs: tuple[bool, bool, bool],
             slices: tuple[bool, ...] | None = None, saved: tuple = ()
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)``, each only when ``needs`` asks for it: :func:`fastlora._C.backward`, then
    ``dx += dy W`` if torch does the GEMM."""
    if slices is not None:
        dx, dA, dB = backward(grad_out, x, weight, lora_A, expand_slices(lora_B, slices, weight.shape[0]), scale,
                              dropout_p, seed, needs)
        return dx, dA, None if dB is None else stack_slices(dB, slices)
    in_extension = _gemm == "openblas"
    dx, dA, dB = _C.backward(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, _seed(seed, dropout_p), *needs,
                             torch.get_num_threads(), in_extension)
    if dx is not None and not in_extension:
        dx.addmm_(grad_out.detach(), weight.detach())
    return dx, dA, dB


def dora_forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                 scale: float, dropout_p: float, seed: Tensor, slices: tuple[bool, ...] | None = None,
                 needs: tuple[bool, bool, bool, bool] | None = None) -> tuple[Tensor, tuple]:
    """``(out, saved)`` of DoRA: :func:`fastlora._C.dora_forward`, norms, factors and the base products all in the
    extension (the chosen GEMM). ``saved`` is ``(norm, output, bias, dropped)``: dm reduces against the output
    itself (``u = (y - b) / c``, which costs no memory while the caller keeps y) unless dropout or a zero factor
    needs the dropped path's own ``u``; ``output`` and ``dropped`` are None when dm is not wanted."""
    dense_B = expand_slices(lora_B, slices, weight.shape[0]) if slices is not None else lora_B
    want_dm = needs is not None and needs[3]
    out, norm, dropped = _C.dora_forward(x, weight, bias, lora_A, dense_B, magnitude, slices, scale, dropout_p,
                                         _seed(seed, dropout_p), torch.get_num_threads(), _gemm == "torch", want_dm)
    if needs is None:
        return out, ()
    if not want_dm or dropped is not None:
        return out, (norm, None, None, dropped)
    return out, (norm, out, bias, None)


def dora_backward(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                  scale: float, dropout_p: float, seed: Tensor, needs: tuple[bool, bool, bool, bool],
                  slices: tuple[bool, ...] | None = None, saved: tuple = ()
                  ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB, dm)``, each only when ``needs`` asks for it: :func:`fastlora._C.dora_backward` with
    :func:`dora_forward`'s ``saved`` (its forward run again when empty)."""
    if not saved:
        saved = dora_forward(x, weight, None, lora_A, lora_B, magnitude, scale, dropout_p, seed, slices, needs)[1]
    norm, output, bias, dropped = saved
    dense_B = expand_slices(lora_B, slices, weight.shape[0]) if slices is not None else lora_B
    dx, dA, dB, dm = _C.dora_backward(grad_out, x, weight, lora_A, dense_B, magnitude, slices, norm, output, bias,
                                      dropped, scale, dropout_p, _seed(seed, dropout_p), *needs,
                                      torch.get_num_threads(), _gemm == "torch")
    if dB is not None and slices is not None:
        dB = stack_slices(dB, slices)
    return dx, dA, dB, dm


def forward_mixed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_As: list[Tensor], lora_Bs: list[Tensor],
                  scales: list[float], dropout_ps: list[float], rows: Rows, seed: Tensor) -> Tensor:
    """``(M, out)`` mixed-batch output: :func:`fastlora._C.forward_mixed` (which groups the rows by adapter and
    checks every argument), then ``+= x W^T`` if torch does the GEMM."""
    out, base_done = _C.forward_mixed(x, weight, bias, lora_As, lora_Bs, scales, dropout_ps, rows.ids,
                                      _seed(seed, max(dropout_ps, default=0.0)), torch.get_num_threads(),
                                      _gemm == "openblas")
    if not base_done:
        out.addmm_(x.detach(), weight.detach().t())
    return out


def backward_mixed(grad_out: Tensor, x: Tensor, weight: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor],
                   scales: list[float], dropout_ps: list[float], rows: Rows, seed: Tensor, need_dx: bool,
                   need_lora: list[bool]) -> tuple[Tensor | None, list[Tensor | None], list[Tensor | None]]:
    """``(dx, dAs, dBs)`` of :func:`forward_mixed`: :func:`fastlora._C.backward_mixed` (which makes dA, dB for
    each adapter that ``need_lora`` asks for and some row names, None otherwise), then ``dx += dy W`` if torch
    does the GEMM."""
    in_extension = _gemm == "openblas"
    dx, dAs, dBs = _C.backward_mixed(grad_out, x, weight, lora_As, lora_Bs, scales, dropout_ps, rows.ids,
                                     _seed(seed, max(dropout_ps, default=0.0)), need_dx, need_lora,
                                     torch.get_num_threads(), in_extension)
    if dx is not None and not in_extension:
        dx.addmm_(grad_out.detach(), weight.detach())
    return dx, dAs, dBs
