"""Shared layer-benchmark runner: the contenders, their inputs, interleaved timing and memory.

Every contender computes the same LoRA layer ``y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` (or, for
``plain`` and ``merged``, the floors it is measured against) on the same tensors in the same
process. :func:`measure` warms each contender up, then times them in interleaved rounds (the
order rotates every round, see :mod:`timing`) so that load from other processes hits all of them
alike, and keeps every sample so that medians and spreads can be reported. On CUDA it times with
CUDA events and rotates through copies of the inputs larger than L2; on CPU it uses
``time.perf_counter``.

Modes: ``forward`` runs under ``torch.no_grad()`` (dropout active when the case has it);
``backward`` runs forward and backward with W and b frozen and grads for x, A and B.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from timing import calls_per_sample, interleaved, median, spread, time_calls
from torch import Tensor, nn

import fastlora

MODES = ("forward", "backward")
BASELINES = ("plain", "unfused", "unfused-compiled", "merged")
PEERS = ("peft", "peft+accelerate", "loralib")
_ENV = "FASTLORA_BACKEND"


@dataclass(frozen=True)
class Case:
    """One benchmark point: a projection shape, token count, rank, dropout, dtype and mode."""

    in_features: int
    out_features: int
    tokens: int
    rank: int
    dropout: float
    mode: str
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def shape(self) -> str:
        return f"{self.in_features}->{self.out_features}"

    @property
    def label(self) -> str:
        return f"{self.shape} M={self.tokens} r={self.rank} p={self.dropout} {self.dtype}"


@dataclass
class Inputs:
    """The tensors every contender of a case shares; ``xs``/``grads`` are rotated copies."""

    xs: list[Tensor]
    grads: list[Tensor]
    weight: Tensor
    bias: Tensor
    lora_A: Tensor
    lora_B: Tensor
    scale: float
    dropout: float


@dataclass
class Built:
    """A contender ready to run: ``fn(x) -> y`` and the parameter tensors it owns."""

    fn: Callable[[Tensor], Tensor]
    params: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Contender:
    """A named way to compute the layer; ``backend`` forces a fastlora backend while it runs."""

    name: str
    build: Callable[[Inputs], Built]
    backend: str | None = None
    modes: tuple[str, ...] = MODES

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Force this contender's fastlora backend (if any) for the duration of the block."""
        if self.backend is None:
            yield
            return
        previous = os.environ.get(_ENV)
        os.environ[_ENV] = self.backend
        try:
            yield
        finally:
            if previous is None:
                del os.environ[_ENV]
            else:
                os.environ[_ENV] = previous


@dataclass(kw_only=True)
class Timed:
    """What every measurement has: whether it ran (and why not), its timing samples in seconds."""

    status: str = "ok"
    reason: str = ""
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def spread(self) -> float:
        return spread(self.samples)

    def to_dict(self) -> dict:
        row = asdict(self)
        row["case"] = asdict(self.case)
        row.update(median_s=self.median, spread=self.spread)
        return row


@dataclass
class Result(Timed):
    """One contender on one case: every timing sample (seconds per call) and the memory figures."""

    case: Case
    contender: str
    calls_per_sample: int = 0
    saved_bytes: int | None = None
    saved_bytes_beyond_input: int | None = None
    peak_bytes: int | None = None
    rel_err: float | None = None


# ---------------------------------------------------------------- the computations


def unfused_lora(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 scale: float, dropout: float) -> Tensor:
    """peft's eager computation: ``F.linear(x, W, b) + lora_B(lora_A(dropout(x))) * s``."""
    x_lora = F.dropout(x, dropout, training=True) if dropout > 0 else x
    return F.linear(x, weight, bias) + F.linear(F.linear(x_lora, lora_A), lora_B) * scale


_compiled_unfused: Callable[..., Tensor] | None = None


def _compiled() -> Callable[..., Tensor]:
    """One ``torch.compile`` of :func:`unfused_lora` shared by all cases (recompiles per shape as needed).

    Grad mode, dropout on/off and x needing grad each make a variant; a grid needs more than
    dynamo's default limit of 8, past which it would silently run the function eagerly.
    """
    global _compiled_unfused
    if _compiled_unfused is None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
        _compiled_unfused = torch.compile(unfused_lora)
    return _compiled_unfused


def _build_fastlora(inputs: Inputs) -> Built:
    i = inputs
    return Built(lambda x: fastlora.lora_linear(x, i.weight, i.bias, i.lora_A, i.lora_B, i.scale, i.dropout))


def _build_plain(inputs: Inputs) -> Built:
    return Built(lambda x: F.linear(x, inputs.weight, inputs.bias))


def _build_unfused(inputs: Inputs) -> Built:
    i = inputs
    return Built(lambda x: unfused_lora(x, i.weight, i.bias, i.lora_A, i.lora_B, i.scale, i.dropout))


def _build_unfused_compiled(inputs: Inputs) -> Built:
    i, fn = inputs, _compiled()
    return Built(lambda x: fn(x, i.weight, i.bias, i.lora_A, i.lora_B, i.scale, i.dropout))


def _build_merged(inputs: Inputs) -> Built:
    i = inputs
    delta = (i.lora_B.detach().double() @ i.lora_A.detach().double()) * i.scale
    merged = (i.weight.double() + delta).to(i.weight.dtype)
    return Built(lambda x: F.linear(x, merged, i.bias), [merged])


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _trainable(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True)


def _build_peft(inputs: Inputs) -> Built:
    from peft import LoraConfig, inject_adapter_in_model

    i = inputs
    out_features, in_features = i.weight.shape
    rank = i.lora_A.shape[0]
    holder = nn.Module()
    holder.proj = nn.Linear(in_features, out_features, device="meta")
    holder.proj.weight, holder.proj.bias = _frozen(i.weight), _frozen(i.bias)
    config = LoraConfig(r=rank, lora_alpha=i.scale * rank, lora_dropout=i.dropout, target_modules=["proj"])
    inject_adapter_in_model(config, holder)
    layer = holder.proj
    layer.lora_A["default"].weight = _trainable(i.lora_A)
    layer.lora_B["default"].weight = _trainable(i.lora_B)
    layer.scaling["default"] = i.scale
    layer.train()
    return Built(layer, list(layer.parameters()))


def _build_peft_accelerated(inputs: Inputs) -> Built:
    """peft's layer made to compute through fastlora (the backend fastlora picks) by ``fastlora.accelerate``."""
    built = _build_peft(inputs)
    fastlora.accelerate(built.fn, strict=True)
    return built


def _build_loralib(inputs: Inputs) -> Built:
    import loralib

    i = inputs
    out_features, in_features = i.weight.shape
    rank = i.lora_A.shape[0]
    layer = loralib.Linear(in_features, out_features, r=rank, lora_alpha=i.scale * rank, lora_dropout=i.dropout,
                           merge_weights=False, device="meta")
    layer.weight, layer.bias = _frozen(i.weight), _frozen(i.bias)
    layer.lora_A, layer.lora_B = _trainable(i.lora_A), _trainable(i.lora_B)
    layer.scaling = i.scale
    layer.train()
    return Built(layer, list(layer.parameters()))


def _installed(module: str) -> str:
    """"" if ``module`` imports, else the reason it does not."""
    try:
        __import__(module)
    except ImportError as error:
        return f"{module} not installed ({error})"
    return ""


_BACKEND_DEVICE = {"cpu": "cpu", "triton": "cuda"}


def contenders(device: str = "cpu") -> tuple[list[Contender], dict[str, str]]:
    """Every contender that can run on ``device``, and the reason for each one that cannot."""
    available, missing = [], {}
    for name, status in fastlora.backends().items():
        home = _BACKEND_DEVICE.get(name, device)
        if not status.available:
            missing[f"fastlora-{name}"] = status.reason
        elif home != device:
            missing[f"fastlora-{name}"] = f"runs on {home}, this run is on {device}"
        else:
            available.append(Contender(f"fastlora-{name}", _build_fastlora, backend=name))
    available += [Contender("plain", _build_plain), Contender("unfused", _build_unfused)]
    if device == "cpu" and not any(shutil.which(cc) for cc in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        missing["unfused-compiled"] = "torch.compile on CPU needs a C++ compiler and none was found"
    else:
        available.append(Contender("unfused-compiled", _build_unfused_compiled))
    available.append(Contender("merged", _build_merged, modes=("forward",)))
    for name, build in (("peft", _build_peft), ("peft+accelerate", _build_peft_accelerated),
                        ("loralib", _build_loralib)):
        reason = _installed(name.partition("+")[0])
        if reason:
            missing[name] = reason
        else:
            available.append(Contender(name, build))
    return available, missing


# ---------------------------------------------------------------- inputs


def _rotation_copies(case: Case, bytes_per_call: int) -> int:
    """How many input copies to cycle through so that each call misses L2 (1 on CPU)."""
    if case.device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(16, math.ceil(2 * l2 / max(bytes_per_call, 1))))


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Fresh random (non-zero) inputs for ``case``; A and B need grads in ``backward`` mode."""
    torch.manual_seed(seed)
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(dtype)

    backward = case.mode == "backward"
    n_in, n_out, m, r = case.in_features, case.out_features, case.tokens, case.rank
    per_call = (m * n_in + (m * n_out if backward else 0)) * torch.finfo(dtype).bits // 8
    copies = _rotation_copies(case, per_call)
    return Inputs(
        xs=[randn(m, n_in).requires_grad_(backward) for _ in range(copies)],
        grads=[randn(m, n_out) for _ in range(copies)] if backward else [],
        weight=randn(n_out, n_in, std=n_in**-0.5),
        bias=randn(n_out, std=0.1),
        lora_A=randn(r, n_in, std=n_in**-0.5).requires_grad_(backward),
        lora_B=randn(n_out, r, std=r**-0.5).requires_grad_(backward),
        scale=2.0,
        dropout=case.dropout,
    )


# ---------------------------------------------------------------- running and timing


def call(built: Built, inputs: Inputs, mode: str, i: int) -> None:
    """One forward (no grad) or forward + backward on the ``i``-th rotated input copy."""
    x = inputs.xs[i % len(inputs.xs)]
    if mode == "forward":
        with torch.no_grad():
            built.fn(x)
        return
    for t in (x, inputs.lora_A, inputs.lora_B, *built.params):
        t.grad = None
    built.fn(x).backward(inputs.grads[i % len(inputs.grads)])


def runner(built: Built, inputs: Inputs, mode: str) -> Callable[[], None]:
    """One :func:`call` per call, each on the next rotated input copy."""
    counter = itertools.count()
    return lambda: call(built, inputs, mode, next(counter))


def _float64_expected(inputs: Inputs) -> Tensor:
    i = inputs
    x, w, a, b = (t.detach().double() for t in (i.xs[0], i.weight, i.lora_A, i.lora_B))
    return x @ w.t() + i.bias.double() + i.scale * (x @ a.t()) @ b.t()


def _rel_err(built: Built, inputs: Inputs, expected: Tensor) -> float:
    with torch.no_grad():
        y = built.fn(inputs.xs[0]).double()
    return float((y - expected).norm() / expected.norm())


def saved_bytes(built: Built, inputs: Inputs) -> tuple[int, int]:
    """Bytes saved for backward by one forward: (all activations, activations beyond the input x).

    Counted with ``saved_tensors_hooks``; tensors are deduplicated by storage, and storages of
    parameters (W, b, A, B, the contender's own) are skipped, so only activations count. The
    second figure leaves out x itself, which the layer before keeps alive anyway in a model.
    """
    x = inputs.xs[0]
    owned = (inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, *built.params)
    excluded = {t.untyped_storage().data_ptr() for t in owned}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = built.fn(x)
    y.backward(inputs.grads[0])
    total = sum(seen.values())
    return total, total - seen.get(x.untyped_storage().data_ptr(), 0)


def peak_bytes(built: Built, inputs: Inputs, mode: str) -> int:
    """CUDA memory allocated at the peak of one call, above what was allocated before it."""
    for t in (*inputs.xs, inputs.lora_A, inputs.lora_B, *built.params):
        t.grad = None  # so that "before" holds no grads of earlier calls
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call(built, inputs, mode, 0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _prepare(contender: Contender, case: Case, inputs: Inputs, expected: Tensor | None) -> tuple[Built, Result]:
    """Build and warm up one contender (compiling if it compiles) and take its memory figures."""
    result = Result(case, contender.name)
    with contender.active():
        built = contender.build(inputs)
        call(built, inputs, case.mode, 0)
        if expected is not None and contender.name != "plain":
            result.rel_err = _rel_err(built, inputs, expected)
        if case.mode == "backward":
            result.saved_bytes, result.saved_bytes_beyond_input = saved_bytes(built, inputs)
        if case.device == "cuda":
            result.peak_bytes = peak_bytes(built, inputs, case.mode)
    return built, result


def measure(case: Case, pool: list[Contender], repeats: int = 7, min_sample_s: float = 0.02) -> list[Result]:
    """Time every contender of ``pool`` that supports ``case.mode`` in ``repeats`` interleaved rounds.

    A contender that fails to build or run is reported with status "error" and the reason.
    Each sample averages enough back-to-back calls to last about ``min_sample_s``.
    """
    inputs = make_inputs(case)
    expected = _float64_expected(inputs) if case.dropout == 0 else None
    ready: list[tuple[Contender, Callable[[], None], Result]] = []
    failed: list[Result] = []
    for contender in (c for c in pool if case.mode in c.modes):
        try:
            built, result = _prepare(contender, case, inputs, expected)
        except Exception as error:  # a broken contender must not stop the others
            failed.append(Result(case, contender.name, status="error", reason=f"{type(error).__name__}: {error}"))
            continue
        run = runner(built, inputs, case.mode)
        with contender.active():  # the second warm-up call, timed to calibrate
            result.calls_per_sample = calls_per_sample(run, min_sample_s, case.device)
        ready.append((contender, run, result))

    def sampler(contender: Contender, run: Callable[[], None], result: Result) -> Callable[[], float]:
        def sample() -> float:
            with contender.active():
                return time_calls(run, result.calls_per_sample, case.device)
        return sample

    samples = interleaved({r.contender: sampler(c, run, r) for c, run, r in ready}, repeats)
    for _, _, result in ready:
        result.samples = samples[result.contender]
    return [result for _, _, result in ready] + failed


def ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    """Per contender of one case: speedup vs ``unfused`` and overhead vs ``plain`` (0.1 reads +10%)."""
    medians = {r.contender: r.median for r in results if r.status == "ok"}
    out = {}
    for name, seconds in medians.items():
        out[name] = {
            "speedup_vs_unfused": medians.get("unfused", math.nan) / seconds,
            "overhead_vs_plain": seconds / medians.get("plain", math.nan) - 1,
        }
    return out
