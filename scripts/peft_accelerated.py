"""A pytest plugin that runs peft's own test suite with every peft model accelerated by fastlora.

It checks fastlora's claim that :func:`fastlora.accelerate` changes nothing observable but speed: each time peft
injects adapters into a model (``BaseTuner.inject_adapter``, which ``get_peft_model``, ``PeftModel.__init__`` and
``from_pretrained``, ``add_adapter``, ``load_adapter``, ``inject_adapter_in_model``, ``add_weighted_adapter``
and the mixed model all go through), the plugin calls ``fastlora.accelerate`` on that model right after, so
every supported ``lora.Linear`` becomes a ``FusedLinear`` before the test touches it. Models without LoRA
layers (other peft methods) are left alone.

Usage, from a checkout of peft's source at the installed version (only its ``tests/`` are used, against the
installed peft)::

    cd /tmp/peft-src
    PYTHONPATH=/path/to/fastlora:/path/to/fastlora/scripts HF_HUB_OFFLINE=1 \\
        python -m pytest -p peft_accelerated -o addopts="" -p no:cacheprovider -q \\
        tests/test_custom_models.py -k lora

Run the same command without ``-p peft_accelerated`` for the baseline; the tests that fail only with the
plugin are what acceleration changes. ``FASTLORA_BACKEND=reference|cpu`` picks fastlora's backend as usual.

At the end of the session the plugin prints how many times it accelerated a model, how many layers it fused and
which stayed on peft's forward (and why), and how many forward calls of fused layers ran fastlora's op versus
fell back to peft's forward. ``PEFT_ACCELERATED_STATS=path.json`` also writes, per test, the models accelerated,
layers fused and fused/fallback forward calls (to tell whether a failing test ever ran the op; its tests that
did are the only ones whose outcome can depend on ``FASTLORA_BACKEND``).

Offline, peft's tests that reach the Hugging Face Hub fail either way (in both runs), but each first retries
with backoff sleeps; patching ``huggingface_hub.utils._http``'s ``time.sleep`` to a no-op (and pointing
``HTTPS_PROXY`` at a closed port) in a separate helper plugin loaded in both runs makes them fail fast.
"""

from __future__ import annotations

import collections
import functools
import importlib
import json
import os

import pytest

_STATS = {
    "models": 0,  # inject_adapter calls after which a model held peft LoRA layers
    "non_lora": 0,  # inject_adapter calls on models without LoRA layers (other peft methods)
    "errors": collections.Counter(),  # accelerate raising anything but "no LoRA layers"
    "fused_layers": 0,
    "unfused_layers": collections.Counter(),  # reason (its layer-specific part trimmed) -> count
    "fused_calls": 0,  # FusedLinear forwards that ran fastlora's op
    "fallback_calls": collections.Counter(),  # FusedLinear forwards handed to peft's forward, by reason
}
_PER_TEST: dict[str, dict[str, int]] = {}
_current: dict[str, int] = collections.Counter()


def _reason_kind(why: str) -> str:
    """A reason with its adapter name dropped, so that equal causes count together."""
    if why.startswith("adapter "):
        head, _, rest = why.partition(" ")[2].partition(" ")
        return f"adapter <name> {rest}" if head else why
    return why


def _fallback_reason(layer, x, args, kwargs) -> str:
    """Why ``fastlora.accelerate._fused_forward`` handed a call to peft (mirrors its checks, in its order)."""
    acc = importlib.import_module("fastlora.accelerate")  # the module (the package's name is the function)

    if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
        return "extra forward arguments"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapters merged"
    base = layer.base_layer
    if any(t is not None and t.requires_grad for t in (base.weight, base.bias)):
        return "trainable base weight or bias"
    if kwargs.get("adapter_names") is not None:
        return "adapter_names batch the mixed op does not take"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return "no active adapter in this layer"
    for name in active:
        problem = acc._adapter_problem(layer, name)
        if problem is not None:
            return _reason_kind(problem)
    return f"dtypes the op does not take (x {x.dtype})"


def _install() -> None:
    from peft.tuners.tuners_utils import BaseTuner

    import fastlora

    acc = importlib.import_module("fastlora.accelerate")

    original_inject = BaseTuner.inject_adapter
    if getattr(original_inject, "_peft_accelerated", False):
        return

    @functools.wraps(original_inject)
    def inject_adapter(self, model, *args, **kwargs):
        result = original_inject(self, model, *args, **kwargs)
        try:
            report = fastlora.accelerate(model)
        except ValueError as error:
            if "holds no peft LoRA layers" not in str(error):
                raise
            _STATS["non_lora"] += 1
            return result
        except Exception as error:  # counted and shown in the summary; the test goes on unaccelerated
            _STATS["errors"][f"{type(error).__name__}: {error}"[:200]] += 1
            return result
        _STATS["models"] += 1
        _STATS["fused_layers"] += len(report.fused)
        _current["models"] += 1
        _current["fused_layers"] += len(report.fused)
        for why in report.unfused.values():
            _STATS["unfused_layers"][_reason_kind(why)] += 1
        return result

    inject_adapter._peft_accelerated = True
    BaseTuner.inject_adapter = inject_adapter

    original_forward = acc._fused_forward

    def fused_forward(layer, x, args, kwargs):
        out = original_forward(layer, x, args, kwargs)
        if out is None:
            _STATS["fallback_calls"][_fallback_reason(layer, x, args, kwargs)] += 1
            _current["fallback_calls"] += 1
        else:
            _STATS["fused_calls"] += 1
            _current["fused_calls"] += 1
        return out

    acc._fused_forward = fused_forward  # FusedLinear.forward looks the name up on every call


def pytest_configure(config) -> None:
    _install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current.clear()
    yield
    _PER_TEST[item.nodeid] = dict(_current)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    from fastlora.ops.dispatch import ENV_VAR

    write = terminalreporter.write_line
    terminalreporter.section("peft_accelerated: fastlora.accelerate on every peft model")
    write(f"{ENV_VAR}={os.environ.get(ENV_VAR, '') or '(unset: automatic)'}")
    write(f"accelerate runs: {_STATS['models']} (one per inject_adapter call on a model with peft LoRA layers: "
          f"get_peft_model, add_adapter, load_adapter, ...; calls on models without any: {_STATS['non_lora']})")
    unfused = sum(_STATS["unfused_layers"].values())
    write(f"layers fused: {_STATS['fused_layers']}; left on peft's forward: {unfused}")
    for why, count in _STATS["unfused_layers"].most_common():
        write(f"  {count:6d}  {why}")
    for why, count in _STATS["errors"].most_common():
        write(f"  accelerate raised ({count}x): {why}")
    fallbacks = sum(_STATS["fallback_calls"].values())
    write(f"FusedLinear forward calls: {_STATS['fused_calls']} through fastlora's op, {fallbacks} on peft's forward")
    for why, count in _STATS["fallback_calls"].most_common():
        write(f"  {count:8d}  {why}")
    ran = sum(1 for stats in _PER_TEST.values() if stats.get("fused_calls"))
    write(f"tests that ran fastlora's op at least once: {ran} of {len(_PER_TEST)}")
    path = os.environ.get("PEFT_ACCELERATED_STATS")
    if path:
        with open(path, "w") as file:
            json.dump(_PER_TEST, file, indent=0, sort_keys=True)
        write(f"per-test counts written to {path}")
