"""Shared fixtures: the backends under test, a float64 reference of the LoRA op, and CI's rule for missing data."""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton kernels run on CPU tensors in CI

import pytest

import fastlora
from fastlora.ops.reference import dropout_keep_mask

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``CI=true``) a test that skips because ../shared/data is missing fails instead: CI ships that
    data, so its absence there is a broken setup, not a reason to check less. Locally such tests skip."""
    outcome = yield
    report = outcome.get_result()
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if str(SHARED_DATA) in reason:
            report.outcome = "failed"
            report.longrepr = f"CI=true but the data is missing: {reason}"


def pytest_terminal_summary(terminalreporter):
    """In CI, the tests that still skipped (e.g. METEOR's without Java), counted in red at the end."""
    skipped = terminalreporter.stats.get("skipped", [])
    if _in_ci() and skipped:
        terminalreporter.write_line(f"CI: {len(skipped)} test(s) skipped and checked nothing (reasons above)",
                                    red=True, bold=True)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def available_backends() -> list[str]:
    return [name for name, status in fastlora.backends().items() if status.available]


def backend_device(name: str) -> str:
    """The device a backend runs on in this test session: triton on the GPU when there is one."""
    return "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"


@pytest.fixture(params=available_backends())
def backend(request, monkeypatch) -> str:
    """Each available backend in turn, forced through FASTLORA_BACKEND."""
    monkeypatch.setenv("FASTLORA_BACKEND", request.param)
    return request.param


def lora_update(x, lora_A, lora_B, scale, slices=None, out_features=None):
    """``scale * (x @ A.T) @ B.T``; with ``slices``, written group by group, independently of the library: enabled
    group g (the j-th enabled one) gets ``scale * (x @ A_j.T) @ B_j.T`` from the j-th blocks of the stacked lora_A
    and lora_B, a disabled group zeros."""
    if slices is None:
        return scale * (x @ lora_A.t()) @ lora_B.t()
    rows, rank = out_features // len(slices), lora_A.shape[0] // sum(slices)
    groups, j = [], 0
    for enabled in slices:
        if enabled:
            A_j, B_j = lora_A[j * rank:(j + 1) * rank], lora_B[j * rows:(j + 1) * rows]
            groups.append(scale * (x @ A_j.t()) @ B_j.t())
            j += 1
        else:
            groups.append(x.new_zeros(*x.shape[:-1], rows))
    return torch.cat(groups, dim=-1)


def float64_reference(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, slices=None):
    """Forward of the op in float64 with an explicit mask (slices as :func:`lora_update`); autograd gives the
    reference grads."""
    x64, w64, a64, b64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, lora_A, lora_B))
    x2 = x64.reshape(-1, x64.shape[-1])
    x_lora = x2
    if dropout_p > 0:
        keep = dropout_keep_mask(torch.as_tensor(seed), x2.shape[0], x2.shape[1], dropout_p, x2.device)
        x_lora = x2 * keep / (1 - dropout_p)
    y = x2 @ w64.t() + lora_update(x_lora, a64, b64, scale, slices, weight.shape[0])
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], weight.shape[0]), (x64, a64, b64)


def float64_dora(x, weight, bias, A, B, m, scale, p, seed, slices):
    """DoRA written out in float64 with the full (out, in) matrix, as peft does; n detached."""
    x64, w64 = x.reshape(-1, x.shape[-1]).double(), weight.double()
    dense = lora_update(torch.eye(x.shape[-1], dtype=torch.float64), A.double(), B.double(), scale, slices,
                        weight.shape[0]).t()  # scale B A, block-structured with slices
    norm = (w64 + dense).norm(dim=1).detach()
    rows = weight.shape[0] // len(slices) if slices else weight.shape[0]
    full_m = torch.ones(weight.shape[0], dtype=torch.float64)
    enabled = [g for g, on in enumerate(slices)] if slices else [0]
    enabled = [g for g in enabled if not slices or slices[g]]
    c = torch.ones(weight.shape[0], dtype=torch.float64)
    for j, g in enumerate(enabled):
        part = slice(g * rows, (g + 1) * rows)
        full_m[part] = m.double()[j * rows:(j + 1) * rows]
        c[part] = full_m[part] / norm[part]
    x_d = x64
    if p:
        x_d = x64 * dropout_keep_mask(torch.tensor(seed), x64.shape[0], x64.shape[1], p, x64.device) / (1 - p)
    y = x64 @ w64.t() + (c - 1) * (x_d @ w64.t()) + c * (x_d @ dense.t())
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], weight.shape[0])


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error."""
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(1e-30)).item()


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 32):
    """A small random Hugging Face GPT-2 (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=101, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def randomize_lora(model, seed: int = 1) -> None:
    """Give every adapter non-zero weights so that comparisons mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(seed))
