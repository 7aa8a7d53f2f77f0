"""LoraConfig: validated LoRA hyper-parameters, and their peft ``adapter_config.json`` form."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

INITS = ("default", "gaussian")
ALL_LINEAR = "all-linear"


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """The LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraConfig:
    """What to adapt and how (field names follow loralib/peft; see ``to_peft``/``from_peft``).

    ``target_modules``: a list of exact module names or name suffixes, a regex string matched
    against the whole name, or ``"all-linear"`` (every Linear/Conv1D except the output head).
    ``slices``: per-target output groups to adapt, e.g. ``{"c_attn": [True, False, True]}``
    for q and v of GPT-2's fused attention projection; keys match like list targets.
    ``use_dora``: DoRA (weight-decomposed LoRA, Liu et al. 2024) as peft computes it.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    slices: dict[str, list[bool]] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "default"
    use_dora: bool = False

    def __post_init__(self) -> None:
        _require(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1,
                 f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        _require(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0,
                 f"LoraConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        _require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                 f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        _require(self.init in INITS, f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        _require(isinstance(self.use_dora, bool), f"LoraConfig.use_dora must be a bool, got {self.use_dora!r}")
        targets = self.target_modules
        _require((isinstance(targets, str) and targets != "") or
                 (isinstance(targets, (list, tuple)) and len(targets) > 0 and all(isinstance(t, str) for t in targets)),
                 "LoraConfig.target_modules must be a non-empty list of names, a regex or 'all-linear', "
                 f"got {targets!r}")
        if isinstance(targets, tuple):
            self.target_modules = list(targets)
        for key, groups in self.slices.items():
            _require(isinstance(groups, (list, tuple)) and len(groups) >= 1 and any(groups)
                     and all(isinstance(g, bool) for g in groups),
                     f"LoraConfig.slices[{key!r}] must be a list of bools with at least one True, got {groups!r}")

    def to_peft(self, ranks: dict[str, int], alphas: dict[str, float], fan_in_fan_out: bool,
                base_model: str | None = None) -> dict[str, Any]:
        """peft ``adapter_config.json`` for the adapted modules (full names) with their ranks and alphas."""
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(ranks),
            "rank_pattern": {name: r for name, r in ranks.items() if r != self.r},
            "alpha_pattern": {name: a for name, a in alphas.items() if a != self.alpha},
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": True if self.init == "default" else "gaussian",
            "modules_to_save": None,
            "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> LoraConfig:
        """The config of a peft LoRA ``adapter_config.json``; other adapter kinds are errors."""
        peft_type = data.get("peft_type")
        _require(peft_type == "LORA", f"adapter_config.json: peft_type must be 'LORA', got {peft_type!r}")
        _require(not data.get("use_qalora"), "adapter_config.json: use_qalora=true is not supported")
        _require(data.get("bias", "none") == "none",
                 f"adapter_config.json: bias={data.get('bias')!r} is not supported (only 'none')")
        _require(not data.get("modules_to_save"),
                 f"adapter_config.json: modules_to_save={data.get('modules_to_save')!r} is not supported")
        init = data.get("init_lora_weights", True)
        targets = data.get("target_modules") or ALL_LINEAR
        if isinstance(targets, str) and targets == "all-linear":
            targets = ALL_LINEAR
        try:
            r, alpha, dropout = int(data.get("r", 8)), float(data.get("lora_alpha", 8)), \
                float(data.get("lora_dropout", 0.0))
        except (TypeError, ValueError) as error:
            raise ValueError(f"adapter_config.json: r, lora_alpha and lora_dropout must be numbers ({error})") from None
        return cls(r=r, alpha=alpha, dropout=dropout, target_modules=targets,
                   use_rslora=bool(data.get("use_rslora", False)), use_dora=bool(data.get("use_dora", False)),
                   init="gaussian" if init == "gaussian" else "default")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
