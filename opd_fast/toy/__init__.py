"""The embedded toy default: a synthetic fact-recall task, a word-level tokenizer and tiny
Qwen3 student/teacher models, built on the CPU from a seed (the student from scratch, the teachers
post-trained from it) and cached.

    from opd_fast.toy import ToyWorldSpec, toy_assets
    assets = toy_assets(spec=ToyWorldSpec(seed=0), cache_dir=None, progress=True)
    assets.student_dir, assets.teacher_dir          # HF model dirs (with the tokenizer)
    assets.teacher("teacher_other_pattern")         # built lazily, then cached
    assets.train_prompts, assets.eval_prompts       # JSONL {"prompt", "answer", ...}
    assets.world                                    # world.json + each built model's metrics

The value "toy" (TOY) of a model or data key selects these files (`resolve_toy`). `tiny` makes
tiny random Hugging Face models and prompt files for tests and smoke runs.

Imports: opd_fast.models only.
"""

from opd_fast.toy.assets import TOY, ToyAssets, default_cache_root, resolve_toy, toy_assets
from opd_fast.toy.spec import (
    MODEL_NAMES,
    TEACHER_NAMES,
    ArchSpec,
    ToyWorldSpec,
    TrainSpec,
)

__all__ = [
    "TOY",
    "MODEL_NAMES",
    "TEACHER_NAMES",
    "ArchSpec",
    "ToyAssets",
    "ToyWorldSpec",
    "TrainSpec",
    "default_cache_root",
    "resolve_toy",
    "toy_assets",
]
