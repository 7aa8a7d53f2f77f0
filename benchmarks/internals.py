"""The one place the benchmarks use fastlora's private modules, which may move; everything else uses the public API.

Some benchmarks time a backend without the op's Python layer, switch the cpu backend's GEMM, or launch the triton
backend's GEMM routes one by one: the functions here name each such use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from torch import Tensor


def backend(name: str) -> ModuleType:
    """Backend ``name``'s module: ``forward``, ``backward``, ``forward_mixed``... on 2-D tensors, no autograd."""
    return importlib.import_module(f"fastlora.ops.{name}")


def backend_for(x: Tensor) -> ModuleType:
    """The backend module the op would run on tensors like ``x`` (honouring ``FASTLORA_BACKEND``)."""
    from fastlora.ops.dispatch import select

    return select(x)


def routing(ids: Tensor, adapters: int, x: Tensor):
    """A mixed batch's routing for 2-D ``x``, as the backends' ``forward_mixed`` takes it."""
    from fastlora.ops.routing import AdapterRouting

    return AdapterRouting(ids, adapters).rows(x.shape[:-1], x.device)


# ---------------------------------------------------------------- the cpu backend's switches


def cpu_gemms() -> tuple[str, ...]:
    """The base-product GEMMs the cpu backend can use."""
    return backend("cpu").GEMMS


def cpu_gemm() -> str:
    return backend("cpu").gemm()


def set_cpu_gemm(name: str) -> None:
    backend("cpu").set_gemm(name)


def cpu_kernels() -> str:
    """The cpu backend's kernels and GEMM, e.g. ``"cpu kernels avx2, base GEMM openblas"``."""
    cpu = backend("cpu")
    return f"cpu kernels {cpu.isa()}, base GEMM {cpu.gemm()}"


def openblas_core() -> str:
    return backend("cpu")._C.blas_core()


# ---------------------------------------------------------------- the triton backend's routes


def tuned_configs() -> list[dict]:
    """The triton backend's autotuning choices so far: its tiled kernels' and the persistent (hopper) GEMM's."""
    return backend("triton").tuned_configs()


def triton_forward(gemm: str, x: Tensor, w: Tensor, b: Tensor, A: Tensor, B: Tensor, scale: float, p: float,
                   seed: Tensor) -> Tensor:
    """The triton backend's forward (down kernel and GEMM) with GEMM route ``gemm`` (``tiled`` or ``hopper``)."""
    triton = backend("triton")
    triton.set_gemm(gemm)
    return triton.forward(x, w, b, A, B, scale, p, seed, None, None)[0]


def triton_saved_for_dx(x: Tensor, w: Tensor, b: Tensor, A: Tensor, B: Tensor, scale: float, p: float,
                        seed: Tensor) -> tuple:
    """What the forward prepares for a backward that asks for dx alone."""
    return backend("triton").forward(x, w, b, A, B, scale, p, seed, None, (True, False, False))[1]


def triton_dx(gemm: str, dy: Tensor, x: Tensor, w: Tensor, A: Tensor, B: Tensor, scale: float, p: float,
              seed: Tensor, saved: tuple) -> Tensor:
    """The backward's dx GEMM alone (dx only asked for: the rank-R term and dropout mask fused) on route ``gemm``."""
    triton = backend("triton")
    triton.set_gemm(gemm)
    return triton.backward(dy, x, w, A, B, scale, p, seed, (True, False, False), None, saved)[0]


def triton_gemm_alone(gemm: str, x: Tensor, w: Tensor, b: Tensor, A: Tensor, B: Tensor, scale: float, p: float,
                      seed: Tensor) -> Callable[[], Tensor]:
    """A call of the forward's GEMM launch alone on route ``gemm``, its input h = dropout(x)·Aᵀ computed once."""
    from fastlora.ops.triton import single

    layout = single.layout(x.shape[0], w.shape[0], A.shape[0], None, x.device.index or 0)
    h = single.down(x, A, B, layout, single.dropout_args(p, seed))

    def call() -> Tensor:
        single.set_gemm(gemm)
        return single.gemm(x, w, b, B, h, scale, layout)
    return call


def hopper_launches(fn: Callable[[], object]) -> set[str]:
    """Which of the persistent kernels (``gemm``: the forward's, ``dx``) one call of ``fn`` launches."""
    from fastlora.ops.triton import single

    launched: set[str] = set()
    launches = {"gemm": single.hopper_gemm, "dx": single.hopper_dx}
    for name, launch in launches.items():
        setattr(single, f"hopper_{name}", lambda *args, name=name, launch=launch: launched.add(name) or launch(*args))
    try:
        fn()
    finally:
        for name, launch in launches.items():
            setattr(single, f"hopper_{name}", launch)
    return launched
