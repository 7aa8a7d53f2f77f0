"""Build script: the optional C++ CPU extension fastlora._C (see csrc/).

The extension is built against the installed torch (it reads tensors natively), so torch must be
importable at build time: install with ``pip install --no-build-isolation`` into an environment that
has torch (an isolated build environment would fetch another torch, whose ABI need not match).
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
    """The extension, linked against libtorch and the OpenBLAS that the scipy-openblas32 wheel ships."""
    import scipy_openblas32
    from torch.utils.cpp_extension import CppExtension

    sources = ["module.cpp", "lora.cpp", "parallel.cpp", "cpu_features.cpp",
               "kernels_portable.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp"]
    headers = ["lora.h", "parallel.h", "cpu_features.h", "kernels.h", "kernels_impl.inc"]
    # Baseline code stays portable (plain x86-64 / armv8); wider code paths carry their own
    # function-level target attributes and are chosen at run time.
    # -fopenmp: libgomp.so.1, the soname of the OpenMP runtime PyTorch's Linux wheels load first.
    flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=x86-64")
    return CppExtension(
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
        optional=optional,
    )


def _ext_modules() -> tuple[list, dict]:
    """The extension and the build command that compiles it, or nothing when it is skipped or cannot build."""
    mode = _build_mode()
    if mode == "skip":
        return [], {}
    try:
        extension = _extension(optional=mode == "auto")
        from torch.utils.cpp_extension import BuildExtension
    except ImportError as error:  # torch or scipy-openblas32 missing at build time
        hint = " (torch must be installed first; pip: --no-build-isolation)" if "torch" in str(error) else ""
        if mode == "force":
            sys.exit(f"fastlora: cannot build the C++ extension: {error}{hint}")
        print(f"fastlora: building without the C++ extension ({error}){hint}", file=sys.stderr)
        return [], {}
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
