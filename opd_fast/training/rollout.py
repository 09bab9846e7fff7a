"""Sampling responses with a Hugging Face model (KV cache, stop at EOS): the student's
on-policy rollouts, and every other place a model answers prompts (evaluation, the teacher's
cold-start data, the paper's diagnostics).

Sequences come back packed as [prompt][response] and right-padded, with explicit position
ids, so that training forwards see exactly the positions generation saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_fast.training.data import Example, render_prompt
from opd_fast.training.distributed import is_sharded


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens
    response_mask: torch.Tensor  # (B, L) True on response tokens (through EOS)
    position_ids: torch.Tensor  # (B, L)
    example_index: list[int]  # which prompt each sequence answers
    responses: list[str]
    truncated: list[bool]  # hit max_new_tokens without EOS
    # (B, L) float32: the engine's log-prob of each response token under the distribution it
    # sampled from (temperature, top-p and the vocabulary limit applied); 0 elsewhere. None
    # when the sampler does not report them.
    engine_log_probs: torch.Tensor | None = None

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def sequence(self, row: int) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of sequence `row`."""
        total = int(self.attention_mask[row].sum())
        prompt = total - int(self.response_mask[row].sum())
        ids = self.input_ids[row, :total].tolist()
        return ids[:prompt], ids[prompt:]

    def select(self, start: int, end: int) -> RolloutBatch:
        """Sequences [start, end), trimmed to their longest real length."""
        length = int(self.attention_mask[start:end].sum(dim=1).max())
        return RolloutBatch(
            input_ids=self.input_ids[start:end, :length],
            attention_mask=self.attention_mask[start:end, :length],
            response_mask=self.response_mask[start:end, :length],
            position_ids=self.position_ids[start:end, :length],
            example_index=self.example_index[start:end],
            responses=self.responses[start:end],
            truncated=self.truncated[start:end],
            engine_log_probs=None
            if self.engine_log_probs is None
            else self.engine_log_probs[start:end, :length],
        )


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


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str] | None = None,
    *,
    prompt_ids: list[list[int]] | None = None,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
    example_index: list[int] | None = None,
    vocab_limit: int | None = None,
) -> RolloutBatch:
    """Sample one response per prompt (repeat prompts for several rollouts each). Prompts are
    text, or already token ids (`prompt_ids`, e.g. a prompt plus a response prefix).
    vocab_limit: never sample ids at or past it (a model whose embedding table is padded past
    the shared vocabulary must not emit ids the other model cannot read)."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    config = _generation_config(tokenizer, eos_ids, max_new_tokens, greedy)
    encoded = prompt_ids if prompt_ids is not None else encode_prompts(tokenizer, prompts)
    sequences: list[tuple[list[int], list[int], bool, list[float]]] = []
    eos_set = set(eos_ids)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device
        )
        distribution = _SamplingDistribution(vocab_limit, temperature, top_p, greedy)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            generation_config=config,
            logits_processor=LogitsProcessorList([distribution]),
            synced_gpus=is_sharded(model),  # FSDP: ranks step together until all are done
        )
        log_probs = distribution.log_probs(output[:, width:]).tolist()
        for row, prompt_ids in enumerate(chunk):
            generated = output[row, width:].tolist()
            response, finished = [], False
            for token in generated:
                response.append(token)
                if token in eos_set:
                    finished = True
                    break
            sequences.append((prompt_ids, response, not finished, log_probs[row][: len(response)]))
    model.train(was_training)
    return pack(sequences, tokenizer, device, example_index or list(range(len(encoded))))


def sample(
    model,
    tokenizer,
    examples: list[Example],
    *,
    repeats: int = 1,
    template: str = "{prompt}",
    **generate_options,
) -> tuple[RolloutBatch, list[Example]]:
    """`repeats` responses to each example: repeat, render with the prompt template, generate
    (generate_options: eos_ids, max_new_tokens, temperature, top_p, ... as `generate` takes).
    Returns the batch and the example each sequence answers."""
    repeated = [example for example in examples for _ in range(repeats)]
    prompts = [render_prompt(example, template, tokenizer) for example in repeated]
    return generate(model, tokenizer, prompts, **generate_options), repeated


def pack(sequences, tokenizer, device, example_index) -> RolloutBatch:
    """A RolloutBatch of (prompt ids, response ids, truncated, response log-probs or None)."""
    length = max(len(prompt) + len(response) for prompt, response, _, _ in sequences)
    count = len(sequences)
    input_ids = torch.full((count, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((count, length), dtype=torch.long)
    response_mask = torch.zeros((count, length), dtype=torch.bool)
    with_log_probs = all(log_probs is not None for _, _, _, log_probs in sequences)
    engine_log_probs = torch.zeros((count, length), dtype=torch.float32)
    for row, (prompt, response, _, log_probs) in enumerate(sequences):
        total = len(prompt) + len(response)
        input_ids[row, :total] = torch.tensor(prompt + response)
        attention_mask[row, :total] = 1
        response_mask[row, len(prompt) : total] = True
        if with_log_probs and response:
            engine_log_probs[row, len(prompt) : total] = torch.tensor(log_probs)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    responses = tokenizer.batch_decode(
        [response for _, response, _, _ in sequences], skip_special_tokens=True
    )
    return RolloutBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        response_mask=response_mask.to(device),
        position_ids=position_ids.to(device),
        example_index=list(example_index),
        responses=responses,
        truncated=[truncated for _, _, truncated, _ in sequences],
        engine_log_probs=engine_log_probs.to(device) if with_log_probs else None,
    )
