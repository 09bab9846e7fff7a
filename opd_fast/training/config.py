"""Training configuration: a frozen dataclass, loadable from YAML/JSON with key=value overrides.

Defaults follow the paper's recipe (docs/math.md, Reading the dynamics); the embedded toy demo
overrides the few that only make sense at scale (see opd_fast.training.recipes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import yaml

from opd_fast.models.hub import HubError, is_dataset_name, is_model_name, parse_dataset_name
from opd_fast.op.names import check_k, check_variant_estimator
from opd_fast.teachers.factory import APIS, OPD_FAST_API, TeacherSpec
from opd_fast.toy import TOY
from opd_fast.training.data import file_kind
from opd_fast.training.distributed import env_world_size
from opd_fast.training.loggers import parse_loggers
from opd_fast.training.threads import check_threads

# The rollout engines (opd_fast.training.rollouts; named here, imported only when built).
ENGINE_NAMES = ("hf", "vllm")

# (keys, the test every one of them must pass, how the error states it). Every number is also
# checked to be finite and of its field's type before these run (see _check_type).
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
            "cold_start_batch_size",
            "cold_start_responses_per_prompt",
        ),
        lambda value: value >= 1,
        ">= 1",
    ),
    (
        (
            "eval_every",
            "checkpoint_every",
            "warmup_steps",
            "eval_max_prompts",
            "micro_batch_tokens",
            "max_staleness",
            "health_window",
            "cold_start_steps",
            "rollout_is_cap",
            "lora_rank",
        ),
        lambda value: value >= 0,
        ">= 0",
    ),
    (
        (
            "rollout_temperature",
            "loss_temperature",
            "eval_temperature",
            "lr",
            "cold_start_lr",
            "grad_clip",
            "teacher_wait_s",
            "lora_alpha",
        ),
        lambda value: value > 0,
        "> 0",
    ),
    (("weight_decay",), lambda value: value >= 0, ">= 0"),
    (("lora_dropout",), lambda value: 0 <= value < 1, "in [0, 1)"),
    (("rollout_top_p", "eval_top_p"), lambda value: 0 < value <= 1, "in (0, 1]"),
    (("adam_beta1", "adam_beta2"), lambda value: 0 <= value < 1, "in [0, 1)"),
    (("seed",), lambda value: 0 <= value < 2**63, "in [0, 2**63)"),
)

# Keys whose value is one of a fixed set.
_CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "reduction": ("token_mean", "seq_mean_token_sum"),
    "lr_schedule": ("constant", "cosine", "linear"),
    "rollout_engine": ENGINE_NAMES,
    "loss_path": ("fused_linear", "logits"),
    "teacher_sharding": ("auto", "replicate", "shard"),
    "rollout_unshard": ("auto", "on", "off"),
}

# auto | cpu | cuda | cuda:N (whether that device exists is checked when models are placed).
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class TrainConfig:
    # Models and data. "toy" selects the embedded default built by opd_fast.toy; a model is a
    # folder or a Hub id (ORG/NAME, through the Hugging Face cache, at *_revision), data a
    # JSONL/Parquet file or hf:ORG/NAME[:SPLIT] with prompt_column and answer_column.
    student: str = TOY
    student_revision: str | None = None
    teacher: str = TOY
    teacher_revision: str | None = None
    teacher_url: str | None = None  # a teacher server (instead of the teacher path)
    teacher_token: str | None = None  # bearer token (api key) for the teacher server
    teacher_api: str = OPD_FAST_API  # opd-fast (serve-teacher) | openai (vLLM and others)
    teacher_model: str | None = None  # teacher_api=openai: the served model's name
    teacher_wait_s: float = 60.0  # how long to wait for an unreachable teacher server
    # Several teachers: name -> a model (folder, Hub id, "toy") or a mapping of path/url,
    # revision, token, api, model. Each prompt goes to the teacher its data row names in
    # teacher_column, else to default_teacher. Leave teacher/teacher_url unset with it.
    teachers: dict | None = None
    teacher_column: str = "teacher"
    default_teacher: str | None = None
    train_data: str = TOY  # JSONL or Parquet with "prompt" and "answer" columns
    eval_data: str = TOY
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    eval_prompt_column: str | None = None  # None: prompt_column (eval sets often differ)
    eval_answer_column: str | None = None  # None: answer_column
    prompt_template: str = "{prompt}"  # or "chat" to use the tokenizer's chat template
    run_dir: str = "runs/opd"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    # CPU threads: auto (the cores this process may use: the same numbers whatever the load),
    # auto-free (the cores other processes leave free: faster on a busy machine, not
    # reproducible) or a count; OPD_FAST_THREADS pins it (opd_fast/training/threads.py).
    threads: int | str = "auto"

    # Schedule.
    steps: int = 100
    prompts_per_step: int = 64
    rollouts_per_prompt: int = 4
    max_new_tokens: int = 7168
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    rollout_batch_size: int = 64  # sequences generated at once
    rollout_engine: str = "hf"  # hf (Hugging Face generate) | vllm (pip install "opd_fast[vllm]")
    rollout_is_cap: float = 0.0  # > 0: weight token losses by min(pi_train / pi_engine, cap)
    # hf under FSDP2: gather the student once per rollout phase, not at every decoding step
    # (auto: when the whole model fits, else it says it falls back).
    rollout_unshard: str = "auto"  # auto | on | off
    # > 0: rollouts for later steps are sampled while the current step trains, with weights
    # exactly this many updates old (0: the synchronous loop).
    max_staleness: int = 0

    # Loss (the fused op).
    k: int = 16
    variant: str = "student_topk"
    estimator: str = "pg"  # pg | exact | tail (docs/math.md, Estimators)
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
    # > 0: micro-batches by tokens instead: sequences grouped by length, each micro-batch's
    # padded size (sequences x longest) at most this many tokens; with pack_sequences, one row
    # of several sequences (each attending only to itself) of at most this many tokens.
    micro_batch_tokens: int = 0
    pack_sequences: bool = False
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
    loggers: str = ""  # besides metrics.jsonl: "tensorboard", "wandb" (comma-separated)

    # Multi-rank runs (torchrun). fsdp_cpu_offload: FSDP2 keeps the student's sharded state in
    # CPU memory (GPU ranks). teacher_sharding: an in-process teacher replicated on every rank,
    # or sharded over the ranks with FSDP2 for its forwards (auto: sharded when a copy would
    # take over a quarter of a rank's memory).
    fsdp_cpu_offload: bool = False
    teacher_sharding: str = "auto"

    # The live health check (opd_fast.training.health): every health_window steps (0: off),
    # the run's dynamics against the paper's failure signature; health_stop: stop (with a
    # checkpoint) when it fails; probe_before_train: the probe's verdict before step 1.
    health_window: int = 10
    health_stop: bool = False
    probe_before_train: bool = False

    # Memory: recompute each decoder layer's activations in the backward instead of keeping
    # them (the same loss and gradients).
    activation_checkpointing: bool = False

    # LoRA (opd_fast.training.lora, docs/lora.md; needs peft: pip install "opd_fast[lora]"):
    # lora_rank > 0 trains only low-rank adapters of the student's linear layers (0: off; the
    # embeddings and output layer always stay frozen). lora_target_modules: "all-linear" or a
    # list of module names (q_proj, v_proj, ...). Checkpoints hold the adapters only.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list | str = "all-linear"

    def validate(self, world_size: int | None = None) -> TrainConfig:
        """Raise ValueError naming the first bad value (its type, range, or the file it
        names, or a limit of a multi-rank run), before anything is loaded; returns self for
        chaining. world_size: the ranks the run will have (default: torchrun's WORLD_SIZE,
        1 outside torchrun)."""
        for field in dataclasses.fields(self):
            _check_type(field.name, str(field.type), getattr(self, field.name))
        for names, holds, bound in _BOUNDS:
            for name in names:
                value = getattr(self, name)
                if not holds(value):
                    raise ValueError(f"config: {name} must be {bound}, got {value}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"config: {name} must be one of {', '.join(choices)}, "
                    f"got {getattr(self, name)!r}"
                )
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(
                f"config: device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        check_k(self.k, where="config: ")
        check_threads(self.threads)
        check_variant_estimator(self.variant, self.estimator, where="config: ")
        if self.teacher_api not in APIS:
            raise ValueError(f"config: teacher_api must be one of {APIS}, got {self.teacher_api!r}")
        if self.teacher_api != OPD_FAST_API and not (self.teacher_url and self.teacher_model):
            raise ValueError(
                f"config: teacher_api {self.teacher_api!r} needs teacher_url and teacher_model"
            )
        servers = self.teacher_url.split(",") if self.teacher_url is not None else []
        if any(not _is_http_url(url.strip()) for url in servers):  # ranks spread over several
            raise ValueError(
                "config: teacher_url must be http(s)://host[:port][/prefix] (or several, "
                f"comma-separated), got {self.teacher_url!r}"
            )
        if self.teacher_token == "":
            raise ValueError(
                "config: teacher_token is empty (leave it out for a server without a token)"
            )
        _check_teachers(self)
        _check_template(self.prompt_template)
        parse_loggers(self.loggers)
        _check_packing(self)
        _check_ranks(self, env_world_size() if world_size is None else world_size)
        _check_lora(self)
        _check_paths(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _is_http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _type_name(declared: str) -> str:
    return declared.replace(" | None", "")


def _check_type(name: str, declared: str, value: Any) -> None:
    """ValueError unless `value` is of the field's declared type (bool is not a number,
    every number is finite)."""
    if value is None and "None" in declared:
        return
    kind = _type_name(declared)
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ValueError(f"config: {name} must be a finite number, got {value}")
    elif kind == "dict":
        ok = isinstance(value, dict)
    elif kind == "int | str":
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
    elif kind == "list | str":
        ok = isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        )
    else:
        ok = isinstance(value, str)
    if not ok:
        wanted = {
            "bool": "true or false", "int": "an integer", "float": "a number",
            "dict": "a mapping", "int | str": "an integer or a string",
            "list | str": "a string or a list of strings",
        }  # fmt: skip
        raise ValueError(
            f"config: {name} must be {wanted.get(kind, 'a string')}, "
            f"got {value!r} ({type(value).__name__})"
        )


# A teacher's name becomes part of metric names (overlap_ratio/<name>).
_TEACHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def teacher_specs(config: TrainConfig) -> dict[str, TeacherSpec]:
    """The config's `teachers` as specs, by name (empty for a single-teacher run)."""
    return {
        name: TeacherSpec.from_entry(name, entry, config)
        for name, entry in (config.teachers or {}).items()
    }


def _check_teachers(config: TrainConfig) -> None:
    if config.teachers is None:
        if config.default_teacher is not None:
            raise ValueError("config: default_teacher needs teachers (a mapping name -> teacher)")
        return
    if not config.teachers:
        raise ValueError("config: teachers is empty (leave it out for a single teacher)")
    if config.teacher != TOY or config.teacher_url is not None:
        raise ValueError(
            "config: give teacher/teacher_url (one teacher) or teachers (several), not both"
        )
    for name in config.teachers:
        if not isinstance(name, str) or not _TEACHER_NAME.fullmatch(name):
            raise ValueError(
                f"config: teachers: a name must be letters, digits, '_', '.' or '-', got {name!r}"
            )
    specs = teacher_specs(config)
    if config.default_teacher is not None and config.default_teacher not in specs:
        raise ValueError(
            f"config: default_teacher {config.default_teacher!r} is not one of the teachers "
            f"({', '.join(specs)})"
        )
    if not config.teacher_column:
        raise ValueError("config: teacher_column is empty")
    if config.cold_start_steps:
        raise ValueError(
            "config: cold_start_steps samples one teacher's answers; with several teachers, "
            "cold-start the student with `opd-fast sft` first"
        )
    if config.pack_sequences and any(spec.url for spec in specs.values()):
        raise ValueError(
            "config: pack_sequences needs in-process teachers: a teacher server scores one "
            "sequence per row (use micro_batch_tokens without packing)"
        )
    for name, spec in specs.items():
        if spec.path is not None:
            _check_model_path(f"teachers.{name}", spec.path)
        if spec.url is not None and not _is_http_url(spec.url):
            raise ValueError(
                f"config: teachers.{name}.url must be http(s)://host[:port][/prefix], "
                f"got {spec.url!r}"
            )


def _check_template(template: str) -> None:
    if template == "chat":
        return
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"config: prompt_template must be 'chat' or a format string using only {{prompt}}, "
            f"got {template!r} ({error})"
        ) from None
    if "{prompt}" not in template:
        raise ValueError(f"config: prompt_template never uses {{prompt}}: {template!r}")


_LORA_KEYS = ("lora_alpha", "lora_dropout", "lora_target_modules")
_OUTPUT_LAYERS = ("lm_head", "embed_tokens", "embed_out", "wte", "output")


def _check_lora(config: TrainConfig) -> None:
    """The LoRA keys, and peft, before any model loads."""
    if not config.lora_rank:
        default = TrainConfig()
        changed = [name for name in _LORA_KEYS if getattr(config, name) != getattr(default, name)]
        if changed:
            raise ValueError(
                f"config: {', '.join(changed)} set but lora_rank is 0 (LoRA off); set "
                "lora_rank > 0 to train LoRA adapters"
            )
        return
    targets = config.lora_target_modules
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ValueError(
                "config: lora_target_modules must be all-linear or a list of module names, "
                f"got {targets!r}"
            )
    else:
        if not targets or any(not name for name in targets):
            raise ValueError(
                f"config: lora_target_modules must name modules (or be all-linear), got {targets}"
            )
        frozen = sorted(set(targets) & set(_OUTPUT_LAYERS))
        if frozen:
            raise ValueError(
                f"config: lora_target_modules names {frozen}: the embeddings and the output "
                "layer stay frozen (the fused linear loss uses the base output weight); "
                "target the decoder's linear layers (or all-linear)"
            )
    from opd_fast.training.lora import peft_available

    if not peft_available():
        raise ValueError('config: lora_rank needs the peft package: pip install "opd_fast[lora]"')


def _check_packing(config: TrainConfig) -> None:
    if not config.pack_sequences:
        return
    if not config.micro_batch_tokens:
        raise ValueError(
            "config: pack_sequences needs micro_batch_tokens (the length of a packed row)"
        )
    if config.teacher_url:
        raise ValueError(
            "config: pack_sequences needs an in-process teacher: a teacher server scores one "
            "sequence per row (use micro_batch_tokens without packing)"
        )


def _check_ranks(config: TrainConfig, world_size: int) -> None:
    """What a run of `world_size` ranks needs of the config."""
    if config.prompts_per_step % world_size:
        raise ValueError(
            f"config: prompts_per_step ({config.prompts_per_step}) must be a multiple of the "
            f"number of ranks ({world_size})"
        )
    if config.teacher_sharding == "shard" and config.teacher_url:
        raise ValueError(
            "config: teacher_sharding: shard applies to an in-process teacher; this one is a "
            "server (teacher_url)"
        )
    if world_size == 1:
        if config.teacher_sharding == "shard":
            raise ValueError(
                "config: teacher_sharding: shard needs several ranks (torchrun, or "
                "--nproc-per-node); one process holds the whole teacher"
            )
        return
    if config.cold_start_steps:
        raise ValueError("config: cold_start_steps is not supported in a multi-rank run yet")
    if config.rollout_unshard == "on" and config.fsdp_cpu_offload:
        raise ValueError(
            "config: rollout_unshard: on gathers the whole student onto the GPU for generation, "
            "which fsdp_cpu_offload keeps off it; use rollout_unshard: auto (it falls back when "
            "the model does not fit) or off"
        )


def _check_paths(config: TrainConfig) -> None:
    """The model folders and data files the config names exist and are what they should be
    (a Hub name is resolved, through the cache, before any model loads)."""
    for name in (
        "student_revision", "teacher_revision", "prompt_column", "answer_column",
        "eval_prompt_column", "eval_answer_column",
    ):  # fmt: skip
        if getattr(config, name) == "":
            raise ValueError(f"config: {name} is empty")
    models = ["student"] + ([] if config.teacher_url else ["teacher"])
    for name in models:
        _check_model_path(name, getattr(config, name))
    for name in ("train_data", "eval_data"):
        path = getattr(config, name)
        if path == TOY:
            continue
        if is_dataset_name(path):
            try:
                parse_dataset_name(path)
            except HubError as error:
                raise ValueError(f"config: {name}: {error}") from None
            continue
        if not os.path.exists(path):
            raise ValueError(f"config: {name} path does not exist: {path}")
        kind = file_kind(path)  # a device or a FIFO would be read forever
        if kind is not None:
            raise ValueError(f"config: {name} must be a JSONL or Parquet file, not {kind}: {path}")
    if os.path.exists(config.run_dir) and not os.path.isdir(config.run_dir):
        raise ValueError(f"config: run_dir exists and is not a folder: {config.run_dir}")


def _check_model_path(name: str, path: str) -> None:
    if path == TOY or is_model_name(path):
        return
    if not os.path.exists(path):
        raise ValueError(
            f"config: {name} path does not exist (nor is it a Hub id ORG/NAME): {path}"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"config: {name} is not a Hugging Face model folder (no config.json in it): {path}"
        )


def _coerce(name: str, raw: Any) -> Any:
    """A --set string, or a YAML/JSON value, as the field's declared type where that is
    lossless (the type itself is checked by validate)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    declared = str(field.type)
    kind = _type_name(declared)
    if not isinstance(raw, str):
        if kind == "float" and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if kind == "int" and isinstance(raw, float) and raw.is_integer():
            return int(raw)  # 1000.0 or 1e3 from YAML: an integer written as a float
        return raw
    if raw.lower() in ("none", "null") and "None" in declared:
        return None
    if kind == "list | str":  # --set lora_target_modules=q_proj,v_proj (or all-linear)
        if raw.strip().startswith("["):
            try:
                return yaml.safe_load(raw)
            except yaml.YAMLError:
                raise ValueError(f"config: {name} must be a YAML/JSON list, got {raw!r}") from None
        return [part.strip() for part in raw.split(",")] if "," in raw else raw
    if kind == "dict":  # --set teachers='{math: /models/a, code: /models/b}'
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"config: {name} must be a YAML/JSON mapping, got {raw!r}") from None
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config: {name} must be true or false, got {raw!r}")
    if kind == "int | str":  # threads: a count or a policy name
        return int(raw) if raw.strip().isdigit() else raw
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        wanted = "an integer" if kind == "int" else "a number"
        raise ValueError(f"config: {name} must be {wanted}, got {raw!r}") from None
    return raw


def make_config(
    values: dict[str, Any] | None = None,
    base: TrainConfig | None = None,
    *,
    world_size: int | None = None,
) -> TrainConfig:
    """A validated TrainConfig from `base` (default: defaults) with `values` applied, for a
    run of `world_size` ranks (TrainConfig.validate).

    Unknown keys raise ValueError listing the valid ones.
    """
    values = dict(values or {})
    valid = field_names()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    coerced = {name: _coerce(name, value) for name, value in values.items()}
    return dataclasses.replace(base or TrainConfig(), **coerced).validate(world_size)


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
    *,
    world_size: int | None = None,
) -> TrainConfig:
    """Read a YAML or JSON file (a flat mapping of TrainConfig keys), then apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_config_file(path))
    values.update(overrides or {})
    return make_config(values, base, world_size=world_size)


def _read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML or JSON file; errors name the file (and the line of a syntax
    error)."""
    if not os.path.exists(path):
        raise ValueError(f"config file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"config file is not a file: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path} cannot be read: {error}") from None
    try:
        loaded = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{where}: not valid YAML ({problem})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return loaded
