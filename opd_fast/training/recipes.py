"""Named configurations: the toy demo, and the paper's setups for real model pairs.

A recipe is a set of config keys plus what a user needs before launching it: the pair, the
GPUs it was sized for, and the memory and step time to expect. The toy demo's are measured;
the real pairs' are estimates from the formulas in `estimate()` (printed as "estimated") until
someone measures them on that hardware. The paper's training defaults are TrainConfig's own
(k = 16, Student Top-k, pg, lr 1e-6, 64 prompts x 4 rollouts, temperature 1.0, 7,168-token
responses); the real recipes restate them so that a reader sees the whole setup in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from opd_fast.training.config import TrainConfig, make_config

TOY_DEMO = {
    "student": "toy",
    "teacher": "toy",
    "train_data": "toy",
    "eval_data": "toy",
    "run_dir": "runs/demo",
    "steps": 75,
    "prompts_per_step": 64,
    "rollouts_per_prompt": 4,
    "max_new_tokens": 24,
    "rollout_batch_size": 256,
    "micro_batch_size": 128,
    "teacher_batch_size": 128,
    # The renormalised (exact) estimator: at the learning rates a tiny model needs, pg on
    # Student Top-k hits the paper's known hazard (student_topk_mass collapses, then accuracy).
    "estimator": "exact",
    "lr": 1e-3,
    "lr_schedule": "constant",
    "eval_every": 25,
    "eval_samples": 1,
    "checkpoint_every": 25,
}

# The paper's OPD settings for reasoning models, on math data: DAPO-Math-17k for training
# (prompt / solution columns), MATH-500 for evaluation (problem / answer), avg@16.
PAPER_MATH = {
    "train_data": "hf:open-r1/DAPO-Math-17k-Processed/en:train",
    "prompt_column": "prompt",
    "answer_column": "solution",
    "eval_data": "hf:HuggingFaceH4/MATH-500:test",
    "eval_prompt_column": "problem",
    "eval_answer_column": "answer",
    "prompt_template": "chat",
    "k": 16,
    "variant": "student_topk",
    "estimator": "pg",
    "lr": 1e-6,
    "prompts_per_step": 64,
    "rollouts_per_prompt": 4,
    "rollout_temperature": 1.0,
    "rollout_top_p": 1.0,
    "max_new_tokens": 7168,
    "reduction": "token_mean",
    "grad_clip": 1.0,
    "steps": 200,
    "eval_every": 25,
    "eval_samples": 16,
    "eval_temperature": 0.7,
    "eval_top_p": 0.95,
    "checkpoint_every": 25,
}

# At scale: bf16, vLLM rollouts, the fused path with checkpointed layers and packed rows.
GPU_SCALE = {
    "device": "cuda",
    "dtype": "bfloat16",
    "rollout_engine": "vllm",
    "rollout_batch_size": 256,
    "loss_path": "fused_linear",
    "activation_checkpointing": True,
    "micro_batch_tokens": 16384,
    "pack_sequences": True,
    "teacher_batch_size": 16,
}


@dataclass(frozen=True)
class Model:
    """What the estimates need of a model: parameters, hidden size, layers."""

    name: str
    billions: float
    hidden: int
    layers: int


QWEN3_1_7B = Model("Qwen/Qwen3-1.7B", 2.03, 2048, 28)
QWEN3_4B = Model("Qwen/Qwen3-4B", 4.02, 2560, 36)
QWEN3_8B = Model("Qwen/Qwen3-8B", 8.19, 4096, 36)
R1_DISTILL_1_5B = Model("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1.78, 1536, 28)
JUSTRL_1_5B = Model("hbx/JustRL-DeepSeek-1.5B", 1.78, 1536, 28)


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    keys: dict
    gpus: int  # the ranks it was sized for; 0: a CPU run
    hardware: str
    student: Model | None = None
    teacher: Model | None = None
    card_gib: float = 80.0
    measured: dict = field(default_factory=dict)  # "memory", "time": measured values

    def config(self, overrides: dict | None = None, *, world_size: int | None = None):
        return make_config({**self.keys, **(overrides or {})}, world_size=world_size)


# ---- estimates -------------------------------------------------------------------------------

BYTES_PER_TRAINED_PARAM = 8  # bf16 weights, gradients and AdamW's two moments
BYTES_PER_FROZEN_PARAM = 2  # the teacher's bf16 weights
VLLM_CARD_FRACTION = 0.35  # the colocated engine's share of the card while it samples
MFU = 0.35  # of the card's dense bf16 peak, for the student's and teacher's GEMMs
PEAK_TFLOPS = 989.0  # H100/H200 dense bf16
DECODE_TOKENS_PER_S = 80.0  # per sequence, a batched 1.5-2B model in vLLM
MEAN_RESPONSE_FRACTION = 0.5  # mean response length over max_new_tokens (reasoning on math)


def estimate(recipe: Recipe) -> dict:
    """Memory per GPU (GiB) and seconds per step, from the recipe's models and keys.

    Memory is the larger of the two phases. Training: the student's sharded state
    (8 bytes/parameter over the GPUs), the teacher's bf16 weights (replicated), and with
    activation checkpointing the layer inputs of one micro-batch (tokens x hidden x 2 bytes
    per layer) plus one layer's recompute and the loss's chunk (about 1 GiB). Sampling: the
    student's state and the teacher, plus vLLM's share of the card (it sleeps while training).
    Time: sampling is bound by the longest response (max_new_tokens at the decode rate),
    training by 8 x student + 2 x teacher parameters of FLOPs per token (forward, backward,
    recompute; the teacher's forward) over the step's tokens at 35% of the peak."""
    if recipe.student is None or recipe.teacher is None:
        return {}
    keys = {**dataclasses.asdict(TrainConfig()), **recipe.keys}
    gib = 1024.0**3
    gpus = max(1, recipe.gpus)
    student_state = recipe.student.billions * 1e9 * BYTES_PER_TRAINED_PARAM / gpus / gib
    teacher = recipe.teacher.billions * 1e9 * BYTES_PER_FROZEN_PARAM / gib
    tokens = keys["micro_batch_tokens"] or keys["micro_batch_size"] * keys["max_new_tokens"]
    layer_inputs = tokens * recipe.student.hidden * 2 * recipe.student.layers / gib
    activations = layer_inputs + 1.0 if keys["activation_checkpointing"] else 6 * layer_inputs
    training = student_state + teacher + activations
    sampling = student_state + teacher + VLLM_CARD_FRACTION * recipe.card_gib
    sequences = keys["prompts_per_step"] * keys["rollouts_per_prompt"]
    step_tokens = sequences * keys["max_new_tokens"] * MEAN_RESPONSE_FRACTION
    flops = step_tokens * 1e9 * (8 * recipe.student.billions + 2 * recipe.teacher.billions)
    train_s = flops / (gpus * PEAK_TFLOPS * 1e12 * MFU)
    rollout_s = keys["max_new_tokens"] / DECODE_TOKENS_PER_S
    return {
        "memory_gib_per_gpu": max(training, sampling),
        "step_seconds": rollout_s + train_s,
        "rollout_seconds": rollout_s,
        "train_seconds": train_s,
    }


def expected(recipe: Recipe) -> tuple[str, str]:
    """The memory and time to expect, as text: measured where measured, else "estimated"."""
    found = estimate(recipe)
    memory = recipe.measured.get("memory") or (
        f"~{found['memory_gib_per_gpu']:.0f} GiB/GPU (estimated)" if found else "n/a"
    )
    time = recipe.measured.get("time") or (
        f"~{found['step_seconds']:.0f} s/step (estimated)" if found else "n/a"
    )
    return memory, time


# ---- the recipes -----------------------------------------------------------------------------


def _pair(student: Model, teacher: Model, run_dir: str, **keys) -> dict:
    return {
        **PAPER_MATH,
        **GPU_SCALE,
        "student": student.name,
        "teacher": teacher.name,
        "run_dir": run_dir,
        **keys,
    }


_RECIPES = (
    Recipe(
        "toy_demo",
        "the embedded toy world (opd-fast demo): a tiny student and a teacher that knows more",
        TOY_DEMO,
        gpus=0,
        hardware="CPU (2 cores)",
        measured={
            "memory": "~1.0 GiB RSS (measured)",
            "time": "~2 min with the toy-world build (measured)",
        },
    ),
    Recipe(
        "qwen3_1.7b_from_4b",
        "Qwen3-1.7B student, Qwen3-4B teacher (same family and thinking pattern), math",
        _pair(QWEN3_1_7B, QWEN3_4B, "runs/qwen3_1.7b_from_4b"),
        gpus=8,
        hardware="8x H100 80GB",
        student=QWEN3_1_7B,
        teacher=QWEN3_4B,
    ),
    Recipe(
        "qwen3_1.7b_from_8b",
        "Qwen3-1.7B student, Qwen3-8B teacher, math",
        _pair(QWEN3_1_7B, QWEN3_8B, "runs/qwen3_1.7b_from_8b"),
        gpus=8,
        hardware="8x H100 80GB",
        student=QWEN3_1_7B,
        teacher=QWEN3_8B,
    ),
    Recipe(
        "qwen3_1.7b_from_8b_cold_start",
        "the same pair with an off-policy cold start (SFT on the teacher's correct answers) "
        "first; one GPU, since the cold start runs on one rank",
        _pair(
            QWEN3_1_7B,
            QWEN3_8B,
            "runs/qwen3_1.7b_from_8b_cold_start",
            cold_start_steps=50,
            cold_start_lr=1e-5,
            cold_start_only_correct=True,
            micro_batch_tokens=8192,
        ),
        gpus=1,
        hardware="1x H100 80GB",
        student=QWEN3_1_7B,
        teacher=QWEN3_8B,
    ),
    Recipe(
        "r1_distill_1.5b_from_justrl",
        "DeepSeek-R1-Distill-Qwen-1.5B student, JustRL-DeepSeek-1.5B teacher (the same model "
        "after RL: new knowledge, same thinking pattern), the paper's successful case",
        _pair(R1_DISTILL_1_5B, JUSTRL_1_5B, "runs/r1_distill_1.5b_from_justrl"),
        gpus=8,
        hardware="8x H100 80GB",
        student=R1_DISTILL_1_5B,
        teacher=JUSTRL_1_5B,
    ),
)

RECIPES: dict[str, Recipe] = {item.name: item for item in _RECIPES}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe(
    name: str, overrides: dict | None = None, *, world_size: int | None = None
) -> TrainConfig:
    """The config of recipe `name` with `overrides` (validated for `world_size` ranks)."""
    return get_recipe(name).config(overrides, world_size=world_size)


def recipe_table() -> list[dict]:
    """One row per recipe: what `opd-fast recipes` prints."""
    rows = []
    for item in _RECIPES:
        memory, time = expected(item)
        pair = (
            f"{item.student.name} <- {item.teacher.name}"
            if item.student and item.teacher
            else "toy <- toy"
        )
        rows.append(
            {
                "name": item.name,
                "pair": pair,
                "hardware": item.hardware,
                "ranks": item.gpus or 1,
                "memory": memory,
                "time": time,
                "summary": item.summary,
            }
        )
    return rows
