"""The `hf` rollout engine: Hugging Face `generate` on the model in this process (KV cache,
stop at EOS). It samples the live model, so there are no weights to sync; or, for rollouts
that run beside training (max_staleness > 0), its own unsharded copy, refreshed by
sync_weights. It reports the log-prob of every sampled token under the distribution it
sampled from (the vocabulary limit, temperature and top-p applied), as the vllm engine does.

A student sharded with FSDP2 would gather every layer at every decoding step; with `unshard`
the engine gathers the whole model once for a rollout phase and reshards it after
(opd_fast.training.distributed.unsharded).
"""

from __future__ import annotations

import contextlib

import torch

from opd_fast.training.distributed import fsdp_units, is_sharded, unsharded
from opd_fast.training.lora import engine_state_items
from opd_fast.training.rollouts.base import RolloutEngine, SamplingSettings
from opd_fast.training.rollouts.batch import RolloutBatch, pack


class HFEngine(RolloutEngine):
    name = "hf"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        batch_size: int = 64,
        unshard: bool = False,
        own_copy: bool = False,
    ):
        """unshard: gather a sharded model once per generate call (see the module doc).
        own_copy: sample an unsharded copy of the model, refreshed by sync_weights."""
        self.tokenizer, self.batch_size, self.unshard = tokenizer, batch_size, unshard
        self.holds_weights = own_copy
        self.model = _unsharded_copy(model) if own_copy else model
        if own_copy:
            self.sync_weights(model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        if not self.holds_weights:
            return
        moved = 0
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in engine_state_items(model, next(self.model.parameters()).dtype):
                state[name].copy_(tensor)
                moved += tensor.numel() * tensor.element_size()
        self.last_sync_bytes = moved

    def generate(
        self,
        prompt_ids: list[list[int]],
        settings: SamplingSettings,
        *,
        seeds: list[int] | None = None,
        example_index: list[int] | None = None,
    ) -> RolloutBatch:
        with unsharded(self.model) if self.unshard else contextlib.nullcontext():
            return generate(
                self.model,
                self.tokenizer,
                prompt_ids,
                settings,
                batch_size=self.batch_size,
                example_index=example_index,
            )


def _unsharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain (unsharded) model of `model`'s architecture, on its device and in the dtype it
    computes in; its weights come from sync_weights."""
    from transformers import AutoModelForCausalLM

    parameter = next(model.parameters())
    compute = parameter.dtype
    units = fsdp_units(model)
    if units:
        compute = getattr(units[0]._get_fsdp_state()._mp_policy, "param_dtype", None) or compute
    copy = AutoModelForCausalLM.from_config(
        model.config, dtype=compute, attn_implementation=model.config._attn_implementation
    )
    copy.to(parameter.device).eval().requires_grad_(False)
    return copy


def _generation_config(tokenizer, eos_ids, max_new_tokens, greedy):
    from transformers import GenerationConfig

    # A fresh config: a model's own generation defaults (top_k=50, repetition penalties...)
    # would make rollouts off-policy. Temperature and top-p are left out here: the
    # SamplingDistribution processor applies them, last, so that it sees the final scores.
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None,
        top_p=None,
        top_k=None if greedy else 0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


class _SamplingDistribution:
    """A logits processor that turns the model's scores into the distribution `generate`
    samples from (vocabulary limit, temperature, top-p; Hugging Face's own warpers) and
    records the log-prob of each sampled token: call t sees the token sampled after call t-1
    as the last input id, so only one (B, V) row of log-probs is held at a time."""

    def __init__(self, vocab_limit: int | None, temperature: float, top_p: float, greedy: bool):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.vocab_limit = vocab_limit
        self.warpers = []
        if not greedy and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if not greedy and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))
        self.previous: torch.Tensor | None = None  # (B, V) log-probs of the last step
        self.steps: list[torch.Tensor] = []  # (B,) log-prob of each sampled token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.record(input_ids[:, -1])
        if self.vocab_limit is not None:
            scores[:, self.vocab_limit :] = float("-inf")
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def record(self, sampled: torch.Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, sampled[:, None]).squeeze(1))
            self.previous = None

    def log_probs(self, generated: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probs of `generated` (the new tokens of one generate call)."""
        if generated.shape[1] > len(self.steps):  # the last sampled token
            self.record(generated[:, len(self.steps)])
        if not self.steps:
            return torch.zeros(generated.shape, dtype=torch.float32)
        return torch.stack(self.steps, dim=1).cpu()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    settings: SamplingSettings,
    *,
    batch_size: int = 64,
    example_index: list[int] | None = None,
) -> RolloutBatch:
    """Sample one response per prompt (token ids; repeat prompts for several rollouts each),
    `batch_size` prompts per generate call. settings.vocab_limit: never sample ids at or past
    it (a model whose embedding table is padded past the shared vocabulary must not emit ids
    the other model cannot read)."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    config = _generation_config(
        tokenizer, list(settings.eos_ids), settings.max_new_tokens, settings.greedy
    )
    sequences: list[tuple[list[int], list[int], bool, list[float]]] = []
    eos_set = set(settings.eos_ids)
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device
        )
        distribution = _SamplingDistribution(
            settings.vocab_limit, settings.temperature, settings.top_p, settings.greedy
        )
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            generation_config=config,
            logits_processor=LogitsProcessorList([distribution]),
            synced_gpus=is_sharded(model),  # FSDP: ranks step together until all are done
        )
        log_probs = distribution.log_probs(output[:, width:]).tolist()
        for row, prompt in enumerate(chunk):
            generated = output[row, width:].tolist()
            response, finished = [], False
            for token in generated:
                response.append(token)
                if token in eos_set:
                    finished = True
                    break
            sequences.append((prompt, response, not finished, log_probs[row][: len(response)]))
    model.train(was_training)
    return pack(sequences, tokenizer, device, example_index or list(range(len(prompt_ids))))
