"""Training configuration: a frozen dataclass, loadable from YAML/JSON with key=value overrides.

Defaults follow the paper's recipe (docs/math.md, Reading the dynamics); the embedded toy demo
overrides the few that only make sense at scale (see opd_fast.training.recipes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import yaml

from opd_fast.op.names import check_k, check_variant_estimator
from opd_fast.teachers.factory import APIS, OPD_FAST_API
from opd_fast.toy import TOY

# (keys, the test every one of them must pass, how the error states it)
_BOUNDS = (
    (
        (
            "steps",
            "prompts_per_step",
            "rollouts_per_prompt",
            "max_new_tokens",
            "rollout_batch_size",
            "micro_batch_size",
            "teacher_batch_size",
            "eval_samples",
        ),
        lambda value: value >= 1,
        ">= 1",
    ),
    (
        ("eval_every", "checkpoint_every", "warmup_steps", "eval_max_prompts", "cold_start_steps"),
        lambda value: value >= 0,
        ">= 0",
    ),
    (
        ("rollout_temperature", "loss_temperature", "eval_temperature", "lr"),
        lambda value: value > 0,
        "> 0",
    ),
    (("rollout_top_p", "eval_top_p"), lambda value: 0 < value <= 1, "in (0, 1]"),
)


@dataclass(frozen=True)
class TrainConfig:
    # Models and data. "toy" selects the embedded default built by opd_fast.toy.
    student: str = TOY
    teacher: str = TOY
    teacher_url: str | None = None  # a teacher server (instead of the teacher path)
    teacher_token: str | None = None  # bearer token (api key) for the teacher server
    teacher_api: str = OPD_FAST_API  # opd-fast (serve-teacher) | openai (vLLM and others)
    teacher_model: str | None = None  # teacher_api=openai: the served model's name
    train_data: str = TOY  # JSONL or Parquet with "prompt" and "answer" columns
    eval_data: str = TOY
    prompt_template: str = "{prompt}"  # or "chat" to use the tokenizer's chat template
    run_dir: str = "runs/opd"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2

    # Schedule.
    steps: int = 100
    prompts_per_step: int = 64
    rollouts_per_prompt: int = 4
    max_new_tokens: int = 7168
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    rollout_batch_size: int = 64  # sequences generated at once

    # Loss (the fused op).
    k: int = 16
    variant: str = "student_topk"
    estimator: str = "pg"
    loss_temperature: float = 1.0
    reduction: str = "token_mean"
    # fused_linear: the loss from hidden states in token chunks (no (B, T, V) logits, for the
    # student or an in-process teacher); logits: the student's full logits (a payload teacher,
    # a server or an OpenAI-compatible engine, always uses this path).
    loss_path: str = "fused_linear"

    # Optimiser.
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    lr_schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    micro_batch_size: int = 8  # sequences per student forward/backward (gradient accumulation)
    teacher_batch_size: int = 8  # sequences per teacher forward (bounds its memory)

    # Off-policy cold start before OPD (0 steps = off): SFT on filtered teacher responses.
    cold_start_steps: int = 0
    cold_start_lr: float = 1e-5
    cold_start_batch_size: int = 32
    cold_start_responses_per_prompt: int = 2
    cold_start_only_correct: bool = False

    # Evaluation, logging, checkpoints.
    eval_every: int = 10  # steps; 0 = only before and after training
    eval_samples: int = 1  # avg@n
    eval_temperature: float = 0.7
    eval_top_p: float = 0.95
    eval_max_prompts: int = 0  # 0 = all
    checkpoint_every: int = 50  # steps; a checkpoint is always written at the end
    progress: bool = True

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad value; returns self for chaining."""
        for names, holds, bound in _BOUNDS:
            for name in names:
                value = getattr(self, name)
                if not holds(value):
                    raise ValueError(f"config: {name} must be {bound}, got {value}")
        check_k(self.k, where="config: ")
        check_variant_estimator(self.variant, self.estimator, where="config: ")
        if self.teacher_api not in APIS:
            raise ValueError(f"config: teacher_api must be one of {APIS}, got {self.teacher_api!r}")
        if self.teacher_api != OPD_FAST_API and not (self.teacher_url and self.teacher_model):
            raise ValueError(
                f"config: teacher_api {self.teacher_api!r} needs teacher_url and teacher_model"
            )
        if self.reduction not in ("token_mean", "seq_mean_token_sum"):
            raise ValueError(
                "config: reduction must be token_mean or seq_mean_token_sum, "
                f"got {self.reduction!r}"
            )
        if self.loss_path not in ("fused_linear", "logits"):
            raise ValueError(
                f"config: loss_path must be fused_linear or logits, got {self.loss_path!r}"
            )
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(
                f"config: lr_schedule must be constant, cosine or linear, got {self.lr_schedule!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"config: dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        for name in ("student", "teacher", "train_data", "eval_data"):
            value = getattr(self, name)
            if name == "teacher" and self.teacher_url:
                continue
            if value != TOY and not os.path.exists(value):
                raise ValueError(f"config: {name} path does not exist: {value}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _coerce(name: str, raw: Any) -> Any:
    """Convert a --set string (or YAML value) to the field's declared type."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    declared = str(field.type)
    if not isinstance(raw, str):
        if "float" in declared and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        return raw
    if raw.lower() in ("none", "null") and "None" in declared:
        return None
    if declared.startswith("bool"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config: {name} must be true or false, got {raw!r}")
    try:
        if declared.startswith("int"):
            return int(raw)
        if declared.startswith("float"):
            return float(raw)
    except ValueError as error:
        raise ValueError(f"config: {name} expects {declared}, got {raw!r}") from error
    return raw


def make_config(
    values: dict[str, Any] | None = None, base: TrainConfig | None = None
) -> TrainConfig:
    """A validated TrainConfig from `base` (default: defaults) with `values` applied.

    Unknown keys raise ValueError listing the valid ones.
    """
    values = dict(values or {})
    valid = field_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    coerced = {name: _coerce(name, value) for name, value in values.items()}
    return dataclasses.replace(base or TrainConfig(), **coerced).validate()


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """['k=8', 'lr=1e-5'] -> {'k': '8', 'lr': '1e-5'}."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = value.strip()
    return overrides


def load_config(
    path: str | None = None,
    overrides: dict[str, Any] | None = None,
    base: TrainConfig | None = None,
) -> TrainConfig:
    """Read a YAML or JSON file (a flat mapping of TrainConfig keys), then apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        if not os.path.exists(path):
            raise ValueError(f"config file not found: {path}")
        with open(path) as handle:
            text = handle.read()
        loaded = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
        values.update(loaded)
    values.update(overrides or {})
    return make_config(values, base)
