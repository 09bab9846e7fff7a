"""The one place that knows the rollout engines: a kind (the rollout_engine key) in, a
RolloutEngine out; the engines' modules (and vLLM) are imported only when chosen."""

from __future__ import annotations

import torch

from opd_fast.training.config import ENGINE_NAMES as ENGINES
from opd_fast.training.rollouts.base import RolloutEngine


def make_engine(
    kind: str,
    model: torch.nn.Module,
    tokenizer,
    *,
    model_path: str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    unshard: bool = False,
    own_copy: bool = False,
) -> RolloutEngine:
    """The engine `kind` names, sampling `model` (its tokenizer `tokenizer`).

    model_path: the directory `model` was loaded from (vLLM builds its engine from it, then
    takes the in-memory weights). batch_size: sequences per HF generate call. seed: the run's
    seed (vLLM's engine seed). max_model_len / max_num_seqs: vLLM's bounds (prompt plus
    response tokens; sequences in flight). unshard, own_copy: the HF engine's (a sharded
    model gathered once per rollout phase; an own copy, for rollouts beside training).
    """
    if kind == "hf":
        from opd_fast.training.rollouts.hf import HFEngine

        return HFEngine(model, tokenizer, batch_size=batch_size, unshard=unshard, own_copy=own_copy)
    if kind == "vllm":
        from opd_fast.training.rollouts.vllm import VLLMEngine

        if model_path is None:
            raise ValueError("the vllm rollout engine needs the model's directory (model_path)")
        return VLLMEngine(
            model,
            tokenizer,
            model_path=model_path,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
        )
    raise ValueError(f"rollout_engine must be one of {ENGINES}, got {kind!r}")
