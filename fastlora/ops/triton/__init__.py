"""The triton backend: fused LoRA forward and backward on CUDA tensors (or on CPU under TRITON_INTERPRET=1).

It provides the backend contract (:class:`fastlora.ops.dispatch.Backend`), the GEMM route (:func:`set_gemm`) and
the autotuner's choices (:func:`tuned_configs`). Inside: :mod:`.single` launches one adapter's kernels,
:mod:`.mixed` those of batches whose rows name their own adapters, :mod:`.tuning` picks every kernel's config;
the kernels are in ``_kernels.py`` (tiled) and ``_hopper.py`` (persistent TMA, sm_90+).
"""

import os

import torch

try:
    import triton  # noqa: F401
except ImportError as error:
    raise ImportError(f"the triton backend needs the triton package ({error})") from error

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    raise ImportError("the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on CPU)")

from fastlora.ops.triton.dora import dora_backward, dora_forward
from fastlora.ops.triton.mixed import backward_mixed, forward_mixed
from fastlora.ops.triton.single import GEMMS, backward, forward, set_gemm
from fastlora.ops.triton.tuning import INTERPRET, tuned_configs

NAME = "triton"
DEVICES = frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"})  # the interpreter runs the kernels on CPU tensors
DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
CHECKS_ARGUMENTS = False

__all__ = ["CHECKS_ARGUMENTS", "DEVICES", "DTYPES", "GEMMS", "NAME", "backward", "backward_mixed", "dora_backward",
           "dora_forward", "forward", "forward_mixed", "set_gemm", "tuned_configs"]
