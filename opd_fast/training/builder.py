"""A config in, everything a training run is made of out: the process group, the data, the
student and its teacher, the loss path, the rollout engine, the optimizer and schedule, the
run log and the checkpointer (`build_run`).

The order matters and is kept: data is read before any model loads (a bad row is reported
before minutes of loading), and the random streams are seeded before anything draws from them.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from opd_fast.models.hub import resolve_model
from opd_fast.models.loading import (
    Placement,
    activation_checkpointing_reason,
    checkpoint_bytes,
    enable_activation_checkpointing,
)
from opd_fast.op.loss import opd_loss
from opd_fast.teachers.base import Teacher
from opd_fast.teachers.factory import TeacherSpec
from opd_fast.toy import resolve_toy
from opd_fast.training.checkpoints import Checkpointer, make_checkpointer
from opd_fast.training.config import TrainConfig, teacher_specs
from opd_fast.training.data import Example, PromptSampler, check_prompt_lengths, load_examples
from opd_fast.training.distributed import (
    Distributed,
    available_memory_bytes,
    teacher_url_for_rank,
    unsharded_bytes,
)
from opd_fast.training.loggers import open_run_log
from opd_fast.training.memory import PeakMemory
from opd_fast.training.metrics import MetricsLog
from opd_fast.training.pair import Pair, load_pair
from opd_fast.training.rollouts import RolloutEngine, make_engine
from opd_fast.training.step.score import LossSettings, choose_loss_path
from opd_fast.training.teacher_routes import TeacherRoutes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class Run:
    """The parts of one training run; the stages of a step (opd_fast.training.step) read them."""

    config: TrainConfig
    dist: Distributed
    paths: dict[str, str]  # student, teacher, train_data, eval_data: "toy" resolved
    train_examples: list[Example]
    eval_examples: list[Example]
    pair: Pair  # student (FSDP2-sharded on several ranks), teacher, tokenizer, shared vocab
    loss: LossSettings
    loss_path: str
    loss_fn: Callable  # opd_loss, or a function with its signature (tests: the reference)
    longest_prompt: int  # tokens, over train and eval prompts
    sampler: PromptSampler
    engine: RolloutEngine  # the student's: rollouts and evaluation
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    log: MetricsLog
    checkpointer: Checkpointer
    memory: PeakMemory
    # Several teachers: which prompt goes to which, and each by name (None, {}: one teacher).
    routes: TeacherRoutes | None = None
    teachers: dict[str, Teacher] = field(default_factory=dict)

    @property
    def student(self) -> torch.nn.Module:
        return self.pair.student

    @property
    def teacher(self) -> Teacher:
        """The run's teacher (with several: the default one, or the first)."""
        return self.pair.teacher

    def teacher_of(self, name: str | None) -> Teacher:
        return self.pair.teacher if name is None else self.teachers[name]

    @property
    def tokenizer(self):
        return self.pair.tokenizer

    @property
    def device(self) -> torch.device:
        return self.pair.placement.device

    def engine_for(self, model: torch.nn.Module, model_path: str) -> RolloutEngine:
        """A config.rollout_engine engine sampling `model` (loaded from `model_path`)."""
        return make_run_engine(self.config, model, self.tokenizer, model_path, self.longest_prompt)


def make_run_engine(
    config,
    model,
    tokenizer,
    model_path: str,
    longest_prompt: int,
    *,
    unshard: bool = False,
    own_copy: bool = False,
):
    """The config's rollout engine for `model` (unshard, own_copy: the hf engine's)."""
    return make_engine(
        config.rollout_engine,
        model,
        tokenizer,
        model_path=model_path,
        batch_size=config.rollout_batch_size,
        seed=config.seed,
        max_model_len=longest_prompt + config.max_new_tokens,
        max_num_seqs=config.rollout_batch_size,
        unshard=unshard,
        own_copy=own_copy,
    )


def rollout_unshard(dist: Distributed, wanted: str, student, device: torch.device) -> bool:
    """Whether the hf engine gathers a sharded student once per rollout phase: `on`, `off`,
    or `auto`: when the whole model takes at most half the memory free on the device (rank 0
    says when it falls back to gathering at every decoding step)."""
    if not dist.active or wanted == "off":
        return False
    if wanted == "on":
        return True
    needed = unsharded_bytes(student)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory_bytes() // max(dist.local_world_size, 1)
    fits = needed <= free / 2
    if not fits and dist.is_main:
        print(
            f"rollout_unshard=auto: the whole student ({needed / 2**30:.2f} GiB) does not fit "
            f"in half the free memory ({free / 2**30:.2f} GiB): generation gathers each layer "
            "at every decoding step",
            flush=True,
        )
    return fits


def resolve_sources(
    config, specs: dict[str, TeacherSpec], with_teacher: bool, dist
) -> dict[str, str]:
    """The config's models and data as local paths: "toy" built, Hub ids through the cache.
    specs: the run's teachers by name; an in-process one's path is under "teacher" (a single
    teacher) or "teachers.<name>"."""
    keys = {
        "student": config.student,
        "train_data": config.train_data,
        "eval_data": config.eval_data,
    }
    teachers = {_teacher_key(config, name): spec for name, spec in specs.items() if with_teacher}
    paths = resolve_toy(keys, progress=config.progress and dist.is_main)
    paths["student"] = resolve_model(paths["student"], config.student_revision)
    paths["teacher"] = None  # a server, or a built teacher: no folder
    for key, spec in teachers.items():
        paths[key] = None
        if spec.path is not None:
            path = resolve_toy({"teacher": spec.path}, progress=config.progress and dist.is_main)
            paths[key] = resolve_model(path["teacher"], spec.revision)
    return paths


def _teacher_key(config, name: str) -> str:
    return f"teachers.{name}" if config.teachers else "teacher"


def build_run(config: TrainConfig, teacher: Teacher | None = None, loss_fn=opd_loss) -> Run:
    """Everything `config` names, loaded and checked. teacher: use this Teacher instead of
    building the one the config names; loss_fn: opd_loss or a function with its signature."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard load/save bars drown the step bar
    # Under torchrun: a process group, this rank's device; else a no-op single process.
    dist = Distributed.from_env(config.device)
    seed_everything(config.seed + dist.rank)  # each rank samples its own rollouts
    routes = TeacherRoutes.from_config(config)
    if routes is not None and teacher is not None:
        raise ValueError(
            "build_run: a built teacher replaces the config's one teacher, not teachers"
        )
    specs = teacher_specs(config) if routes else {"teacher": TeacherSpec.from_config(config)}
    specs = {
        name: replace(spec, url=teacher_url_for_rank(spec.url, dist.rank))
        for name, spec in specs.items()
    }
    # Rank 0 builds the toy world's cache (and fetches Hub models into the Hugging Face
    # cache), then the others find them there. A bad Hub name or revision fails here, before
    # anything loads.
    paths = dist.main_first(lambda: resolve_sources(config, specs, teacher is None, dist))
    placement = Placement.resolve(
        dist.device_name(config.device), config.dtype, config.attn_implementation
    )
    if config.activation_checkpointing:
        reason = activation_checkpointing_reason(paths["student"])
        if reason is not None:
            raise ValueError(f"config: activation_checkpointing is not possible: {reason}")
    sharding = {
        name: dist.teacher_sharding(
            config.teacher_sharding,
            checkpoint_bytes(paths[_teacher_key(config, name)]),
            placement.device,
        )
        if teacher is None and spec.url is None
        else "replicate"
        for name, spec in specs.items()
    }
    # Data first: a bad row (or a teacher name the config lacks) is reported before minutes of
    # model loading.
    teacher_column = config.teacher_column if routes else None
    train_examples = load_examples(
        paths["train_data"], config.prompt_column, config.answer_column, teacher_column
    )
    eval_examples = load_examples(
        paths["eval_data"],
        config.eval_prompt_column or config.prompt_column,
        config.eval_answer_column or config.answer_column,
        teacher_column,
    )
    if config.eval_max_prompts:
        eval_examples = eval_examples[: config.eval_max_prompts]
    if routes is not None:
        routes.check(train_examples, config.teacher_column, "train_data")
        routes.check(eval_examples, config.teacher_column, "eval_data")
    pair, teachers = _load_student_and_teachers(
        config, paths, specs, sharding, placement, teacher, routes
    )
    for name, built in teachers.items():
        if sharding[name] == "shard":
            dist.shard_frozen(built.local_model)
    if config.lora_rank:  # adapters in place, everything else frozen (opd_fast.training.lora)
        from opd_fast.training.lora import apply_lora, parameter_counts

        pair.student = apply_lora(pair.student, config, paths["student"])
        if dist.is_main:
            counts = parameter_counts(pair.student)
            print(
                f"LoRA (rank {config.lora_rank}): {counts['trainable']:,} trainable parameters "
                f"of {counts['total']:,} ({counts['trainable'] / counts['total']:.2%})",
                flush=True,
            )
    if config.activation_checkpointing:
        enable_activation_checkpointing(pair.student)
    pair.student = dist.shard(pair.student, placement.dtype, config.fsdp_cpu_offload)
    loss = LossSettings(
        k=config.k,
        variant=config.variant,
        estimator=config.estimator,
        temperature=config.loss_temperature,
        vocab=pair.vocab,
    )
    loss_path, why = choose_loss_path(config.loss_path, pair.student, loss_fn)
    if loss_path != config.loss_path:
        print(why, flush=True)
    memory = PeakMemory(pair.placement.device)
    positions = getattr(pair.student.config, "max_position_embeddings", None)
    longest_prompt = max(
        check_prompt_lengths(
            examples, config.prompt_template, pair.tokenizer, config.max_new_tokens, positions
        )
        for examples in (train_examples, eval_examples)
    )
    sampler = PromptSampler(train_examples, config.seed)
    # The student's sampler: rollouts and evaluation (vllm: refused here, before any step,
    # when it is not installed or cannot run the student's architecture).
    unshard = config.rollout_engine == "hf" and rollout_unshard(
        dist, config.rollout_unshard, pair.student, placement.device
    )
    # With max_staleness > 0 rollouts run beside training: the hf engine samples its own copy.
    engine = make_run_engine(
        config,
        pair.student,
        pair.tokenizer,
        paths["student"],
        longest_prompt,
        unshard=unshard,
        own_copy=config.max_staleness > 0,
    )
    optimizer = torch.optim.AdamW(  # a LoRA student's: its adapters alone
        [parameter for parameter in pair.student.parameters() if parameter.requires_grad],
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    os.makedirs(config.run_dir, exist_ok=True)
    log = open_run_log(config.run_dir, config.loggers, config.to_dict(), dist.is_main)
    if routes is not None:  # the default teacher's folder, for what samples it
        paths["teacher"] = paths[_teacher_key(config, routes.default or routes.names[0])]
    return Run(
        config=config,
        dist=dist,
        paths=paths,
        train_examples=train_examples,
        eval_examples=eval_examples,
        pair=pair,
        loss=loss,
        loss_path=loss_path,
        loss_fn=loss_fn,
        longest_prompt=longest_prompt,
        sampler=sampler,
        engine=engine,
        optimizer=optimizer,
        scheduler=scheduler,
        log=log,
        checkpointer=make_checkpointer(config.run_dir, dist),
        memory=memory,
        routes=routes,
        teachers=teachers if routes is not None else {},
    )


def _load_student_and_teachers(config, paths, specs, sharding, placement, built, routes):
    """The student with its (first) teacher, and every teacher by name; the loss's vocabulary
    is the columns the student shares with all of them."""

    def where(name: str) -> dict:
        # A teacher to shard loads into host memory; FSDP moves each rank's shard to its device.
        if sharding[name] == "shard":
            return {"teacher_placement": replace(placement, device=torch.device("cpu"))}
        return {}

    def spec_of(name: str) -> TeacherSpec:
        return replace(specs[name], path=paths.get(_teacher_key(config, name)))

    names = list(specs)
    first = routes.default or names[0] if routes is not None else names[0]
    pair = load_pair(
        paths["student"],
        spec_of(first),
        placement,
        student_trainable=True,
        variant=config.variant,
        k=config.k,
        built_teacher=built,
        **where(first),
    )
    teachers, vocab = {first: pair.teacher}, pair.vocab
    for name in names:
        if name != first:
            other = pair.with_teacher(
                spec_of(name), variant=config.variant, k=config.k, **where(name)
            )
            teachers[name], vocab = other.teacher, min(vocab, other.vocab)
    return replace(pair, vocab=vocab), {name: teachers[name] for name in names}
