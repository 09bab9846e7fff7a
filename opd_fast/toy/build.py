"""Building one model of the toy world: train it (from scratch or from the model its recipe
starts from), evaluate, save with the tokenizer."""

from __future__ import annotations

import json
import os
import time

from opd_fast.models.loading import CPU_FP32, load_model
from opd_fast.toy import data, models
from opd_fast.toy.spec import ToyWorldSpec
from opd_fast.toy.tokenizer import build_tokenizer


def _save_quietly(model, out_dir: str) -> None:
    """save_pretrained (safetensors) without transformers' one-shard progress bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def model_seed(spec: ToyWorldSpec, name: str) -> int:
    """Seed of model `name`: distinct per model, fixed by the world's seed."""
    return spec.seed * 1009 + spec.recipe(name).seed_offset


def build_model(spec: ToyWorldSpec, root: str, name: str, out_dir: str, progress: bool) -> dict:
    """Train model `name` of the world rooted at `root` and save it (weights as safetensors,
    tokenizer, generation config, toy_model.json with its metrics) into `out_dir`. A recipe with
    `init_from` starts from that model's saved weights, which must already be built."""
    started = time.perf_counter()
    recipe = spec.recipe(name)
    seed = model_seed(spec, name)
    tokenizer = build_tokenizer(spec)
    facts = data.make_facts(spec)
    stream = data.training_stream(
        spec,
        facts,
        recipe.knows,
        recipe.pattern,
        recipe.train.steps * recipe.train.batch_size,
        recipe.phrasing_shift,
    )
    ids, labels = models.encode_examples(tokenizer, stream)
    if recipe.init_from is None:
        model = models.new_model(recipe.arch, tokenizer, seed)
    else:
        # Post-training starts from the saved weights of the model the recipe names (float32,
        # CPU, the attention implementation new_model gets by default).
        base_dir = os.path.join(root, recipe.init_from)
        model = load_model(base_dir, CPU_FP32, trainable=True)
    final_loss = models.train_model(
        model, ids, labels, recipe.train, seed, progress=progress, description=f"toy {name}"
    )
    train_seconds = time.perf_counter() - started
    eval_rows = data.read_jsonl(os.path.join(root, "eval_prompts.jsonl"))
    metrics = models.evaluate(model, tokenizer, eval_rows, seed)
    _save_quietly(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "name": name,
        "knows": recipe.knows,
        "pattern": recipe.pattern,
        "phrasing_shift": recipe.phrasing_shift,
        "init_from": recipe.init_from,
        "arch": recipe.arch.__dict__,
        "train": recipe.train.__dict__,
        "seed": seed,
        "parameters": models.parameter_count(model),
        "training_sequences": int(ids.shape[0]),
        "worked_examples": len(data.train_pairs(spec, facts, facts.known_by(recipe.knows))),
        "final_train_loss": round(final_loss, 6),
        "eval_accuracy": metrics,
        "train_seconds": round(train_seconds, 2),
        "build_seconds": round(time.perf_counter() - started, 2),
        "build_threads": models.BUILD_THREADS,
    }
    with open(os.path.join(out_dir, "toy_model.json"), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return info
