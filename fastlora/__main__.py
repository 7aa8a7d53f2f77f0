"""``python -m fastlora``: versions, CPU features, GPUs and the backend table."""

from __future__ import annotations

import platform

import torch

import fastlora
from fastlora.ops.dispatch import ENV_VAR, backends, forced_backend


def _cpu_features() -> str:
    """The cpu backend's view (ISA, GEMM) when the extension loads, else the kernel's CPU flags."""
    try:
        from fastlora.ops import cpu
    except ImportError:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            flags = []
        return " ".join(sorted({"avx2", "fma", "avx512f"} & set(flags))) or "unknown"
    return (f"{cpu._C.cpu_vendor()}, kernels {cpu.isa()} (supported: {', '.join(cpu.supported_isas())}), "
            f"base GEMM {cpu.gemm()}, OpenBLAS core {cpu._C.blas_core()}")


def report() -> str:
    """The text ``python -m fastlora`` prints."""
    lines = [
        f"fastlora {fastlora.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}",
        f"cpu features: {_cpu_features()}; torch threads: {torch.get_num_threads()}",
    ]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"gpu {i}: {torch.cuda.get_device_name(i)} (cuda {torch.version.cuda})")
    else:
        lines.append("gpu: none")
    lines.append(f"{ENV_VAR}={forced_backend() or '(unset: automatic)'}")
    lines.append(f"{'backend':<10} {'available':<10} reason")
    for status in backends().values():
        lines.append(f"{status.name:<10} {'yes' if status.available else 'no':<10} {status.reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
