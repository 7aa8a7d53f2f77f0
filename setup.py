"""Build script: the optional C++ CPU extension fastlora._C (see csrc/).

``FASTLORA_BUILD_EXT=0`` skips the extension, ``=1`` makes a failed build an error; unset,
a failed build only leaves the package without its ``cpu`` backend (the reference runs).
"""

import os
import platform
import sys

from setuptools import setup

ENV_VAR = "FASTLORA_BUILD_EXT"


def _build_mode() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "false", "no", "off"):
        return "skip"
    if value in ("1", "true", "yes", "on"):
        return "force"
    sys.exit(f"{ENV_VAR}={value!r}: use 1 (force), 0 (skip) or leave it unset (optional build)")


def _extension(optional: bool):
    """The pybind11 extension, linked against the OpenBLAS that the scipy-openblas32 wheel ships."""
    import scipy_openblas32
    from pybind11.setup_helpers import Pybind11Extension

    sources = ["module.cpp", "lora.cpp", "parallel.cpp", "cpu_features.cpp",
               "kernels_portable.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp"]
    headers = ["lora.h", "parallel.h", "cpu_features.h", "kernels.h", "kernels_impl.inc"]
    # Baseline code stays portable (plain x86-64 / armv8); wider code paths carry their own
    # function-level target attributes and are chosen at run time.
    # -fopenmp: libgomp.so.1, the soname of the OpenMP runtime PyTorch's Linux wheels load first.
    flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=x86-64")
    return Pybind11Extension(
        "fastlora._C",
        [os.path.join("csrc", name) for name in sources],
        depends=[os.path.join("csrc", name) for name in headers],  # rebuild triggers; shipped in sdists
        include_dirs=[scipy_openblas32.get_include_dir()],
        library_dirs=[scipy_openblas32.get_lib_dir()],
        libraries=[scipy_openblas32.get_library()],
        # A regular install finds OpenBLAS beside fastlora in site-packages; fastlora.ops.cpu
        # also loads it before importing _C, which covers editable installs.
        runtime_library_dirs=["$ORIGIN/../scipy_openblas32/lib"],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
        optional=optional,
    )


def _ext_modules() -> list:
    mode = _build_mode()
    if mode == "skip":
        return []
    try:
        return [_extension(optional=mode == "auto")]
    except ImportError as error:  # pybind11 or scipy-openblas32 missing at build time
        if mode == "force":
            raise
        print(f"fastlora: building without the C++ extension ({error})", file=sys.stderr)
        return []


setup(ext_modules=_ext_modules())
