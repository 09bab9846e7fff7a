"""OpenAITeacher: a payload teacher over an OpenAI-compatible completions endpoint (vLLM and
other engines that return prompt log-probs for token-id prompts).

Such an engine scores a prompt in one prefill and returns, per prompt position, the log-prob
of the realised token and of the engine's own top-N tokens. It does not return log-probs at
ids of our choosing (the student's top-k) nor the entropy. So per response position we know
exactly: the teacher's top-k (N >= k) ids and log-probs, log q of the realised token, and log q
at those student ids that happen to be in the returned set. Consequences (docs/math.md):

    variant          needs q at                     exact here?
    teacher_topk     S_q                            yes
    overlap_topk     O = S_p ∩ S_q  (a subset of S_q)  yes
    sampled_token    y_t                            yes
    student_topk     S_p, incl. S_p \\ S_q           no  (refused)
    nonoverlap_topk  S_p △ S_q                      no  (refused)
    union_topk       S_p ∪ S_q                      no  (refused)
    full_vocab       all of V                       no  (refused)

Metrics: overlap_ratio, overlap_mass_student/teacher, overlap_token_advantage,
entropy_student, student_topk_mass, teacher_topk_mass and sampled_token_kl are exact;
entropy_teacher and entropy_gap need H(q) over the whole vocabulary and are not available:
the payload carries NaN there, so they come out NaN (null in metrics.jsonl), never a guess.
Unknown log-probs at student ids are NaN too; opd_loss raises if a loss ever needs one.

Exact also requires: temperature 1 (engines report log-probs of the raw logits; softmax(u/tau)
cannot be rebuilt from a top-N at tau = 1), and a teacher whose output rows equal the shared
vocabulary (an engine normalises over all its rows, the in-process path over the shared ids;
real checkpoints' padded rows carry near-zero but not zero mass, so the difference is tiny).
Ties at the k-th place are broken by the engine, not by "lower id first".

Two response formats (`mode`):
    "prompt_logprobs"  vLLM's extension: {"prompt_logprobs": N}; choices[i].prompt_logprobs
                       is a list with one {token_id: {"logprob": x, ...}} per prompt position
    "echo"             legacy OpenAI: {"echo": true, "logprobs": N,
                       "return_tokens_as_token_ids": true}; choices[i].logprobs holds
                       token_logprobs and top_logprobs keyed "token_id:<id>"
"""

from __future__ import annotations

import json
import logging
import math

from opd_fast.teachers.base import PayloadScoring
from opd_fast.teachers.http import (
    HttpTransport,
    RetryPolicy,
    TeacherProtocolError,
    TeacherRequestError,
)
from opd_fast.teachers.payload_batch import PayloadBatch

logger = logging.getLogger("opd_fast.teachers")

SUPPORTED_VARIANTS = ("teacher_topk", "overlap_topk", "sampled_token")
UNAVAILABLE_METRICS = ("entropy_teacher", "entropy_gap")
MODES = ("prompt_logprobs", "echo")


def _token_id(key) -> int:
    text = str(key)
    if text.startswith("token_id:"):
        text = text[len("token_id:") :]
    try:
        return int(text)
    except ValueError:
        raise TeacherProtocolError(
            f"log-prob key {key!r} is not a token id: ask the engine for token ids "
            "(vLLM: return_tokens_as_token_ids) or use mode='prompt_logprobs'"
        ) from None


def _log_prob(value) -> float:
    value = value["logprob"] if isinstance(value, dict) else value
    return float(value) if value is not None else -math.inf


class OpenAITeacher(PayloadScoring):
    """A payload teacher for the variants an engine's top-N prompt log-probs make exact.

    base_url: the OpenAI-compatible root, e.g. http://host:8000/v1 (POST {base}/completions).
    model: the served model name. variant: the training variant (checked: see module doc).
    vocab_size: the teacher's output rows (the engine does not report them).
    top_logprobs: N >= k log-probs per position to ask for (default: k at each call).
    """

    unknown = math.nan  # the entropy, and log-probs at ids the engine did not return

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        variant: str,
        vocab_size: int,
        api_key: str | None = None,
        mode: str = "prompt_logprobs",
        top_logprobs: int | None = None,
        max_sequences_per_request: int = 32,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        extra_body: dict | None = None,
    ):
        if variant not in SUPPORTED_VARIANTS:
            raise ValueError(
                f"OpenAITeacher cannot train variant {variant!r} exactly: an OpenAI-compatible "
                "engine returns only its own top-N log-probs and the realised token's, not "
                "log-probs at the student's top-k ids (nor the full logits). Supported: "
                f"{', '.join(SUPPORTED_VARIANTS)}; for the others serve the teacher with "
                "`opd-fast serve-teacher`."
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if vocab_size < 1 or max_sequences_per_request < 1:
            raise ValueError("vocab_size and max_sequences_per_request must be >= 1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = HttpTransport(base_url, headers, timeout, retry)
        self.url = self.transport.url
        self.model = model
        self.variant = variant
        self.variants = SUPPORTED_VARIANTS
        self.vocab_size = vocab_size
        self.mode = mode
        self.top_logprobs = top_logprobs
        self.max_sequences_per_request = max_sequences_per_request
        self.extra_body = dict(extra_body or {})
        self._warned_vocab = False

    # ---- tokenizer check -----------------------------------------------------------------

    def check_tokenizer(self, tokenizer, tokenize_url: str | None = None) -> None:
        """Raise ValueError unless the engine tokenizes a probe text (words spread over the
        student's vocabulary) as the student's tokenizer does. Uses vLLM's /tokenize (at the
        server root, or tokenize_url); an engine without it gets a warning, not an error."""

        url = tokenize_url or self.url.removesuffix("/v1") + "/tokenize"
        special = set(tokenizer.all_special_ids)
        step = max(1, len(tokenizer) // 256)
        probe_ids = [i for i in range(0, len(tokenizer), step) if i not in special]
        text = tokenizer.decode(probe_ids)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        transport = HttpTransport(url, self.transport.headers, self.transport.timeout)
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        try:
            _, answer = transport.request("POST", "", json.dumps(body).encode(), "application/json")
        except TeacherRequestError as error:
            if error.status in (404, 405):
                logger.warning("OpenAITeacher: %s has no /tokenize; tokenizer not checked", url)
                return
            raise
        finally:
            transport.close()
        try:
            tokens = [int(t) for t in json.loads(answer)["tokens"]]
        except (ValueError, KeyError, TypeError):
            raise TeacherProtocolError(f"{url}: answer has no token list") from None
        if tokens != expected:
            mismatch = next(
                (i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b),
                min(len(tokens), len(expected)),
            )
            raise ValueError(
                f"the engine at {self.url} tokenizes differently from the student: a probe "
                f"text gives {len(tokens)} vs {len(expected)} tokens, first difference at "
                f"token {mismatch}. OPD compares distributions over one vocabulary, so both "
                "must use one tokenizer."
            )

    # ---- scoring -------------------------------------------------------------------------

    def _body(self, prompts: list[list[int]], count: int) -> dict:
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 1.0}
        if self.mode == "prompt_logprobs":
            body["prompt_logprobs"] = count
        else:
            body.update(echo=True, logprobs=count, return_tokens_as_token_ids=True)
        body.update(self.extra_body)
        return body

    def _position_tables(self, choice: dict, length: int) -> list[dict[int, float]]:
        """Per prompt position 1..length-1: {token id: log-prob}, the engine's top-N plus the
        realised token."""
        if self.mode == "prompt_logprobs":
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list) or len(entries) < length:
                raise TeacherProtocolError(
                    f"{self.url}: choice has no prompt_logprobs for {length} prompt tokens "
                    "(does the engine support vLLM's prompt_logprobs?)"
                )
            return [
                {_token_id(key): _log_prob(value) for key, value in (entries[t] or {}).items()}
                for t in range(1, length)
            ]
        logprobs = choice.get("logprobs") or {}
        top, tokens = logprobs.get("top_logprobs"), logprobs.get("tokens")
        realised = logprobs.get("token_logprobs")
        if not all(isinstance(v, list) and len(v) >= length for v in (top, tokens, realised)):
            raise TeacherProtocolError(
                f"{self.url}: choice lacks echoed prompt log-probs for {length} tokens "
                "(echo=true with logprobs)"
            )
        tables = []
        for t in range(1, length):
            table = {_token_id(key): _log_prob(value) for key, value in (top[t] or {}).items()}
            table[_token_id(tokens[t])] = _log_prob(realised[t])
            tables.append(table)
        return tables

    def _score(self, prompts: list[list[int]], count: int) -> list[list[dict[int, float]]]:
        body = json.dumps(self._body(prompts, count)).encode()
        try:
            _, answer = self.transport.request("POST", "/completions", body, "application/json")
        except TeacherRequestError as error:
            if error.status == 400 and "logprobs" in error.message and str(count) in error.message:
                raise TeacherRequestError(
                    error.status,
                    f"{error.message} -- the engine returns fewer log-probs per position than "
                    f"the {count} asked for: start it with a larger cap (vLLM: --max-logprobs "
                    f"{count}) or lower top_logprobs (>= k)",
                    self.url,
                ) from None
            raise
        try:
            choices = sorted(json.loads(answer)["choices"], key=lambda c: c.get("index", 0))
        except (ValueError, KeyError, TypeError):
            raise TeacherProtocolError(f"{self.url}/completions: answer has no choices") from None
        if len(choices) != len(prompts):
            raise TeacherProtocolError(
                f"{self.url}/completions: {len(choices)} choices for {len(prompts)} prompts"
            )
        return [self._position_tables(c, len(p)) for c, p in zip(choices, prompts)]

    def check_request(self, k: int, temperature: float, vocab_limit: int) -> None:
        if temperature != 1.0:
            raise ValueError(
                f"OpenAITeacher needs temperature 1.0 (engines report log-probs of the raw "
                f"logits), got {temperature}"
            )
        if (self.top_logprobs or k) < k:
            raise ValueError(f"top_logprobs={self.top_logprobs} must be >= k={k}")
        if vocab_limit < self.vocab_size and not self._warned_vocab:
            self._warned_vocab = True
            logger.warning(
                "OpenAITeacher: the engine normalises over its %d output rows, the student side "
                "over the shared %d: log-probs include the padded rows' (tiny) mass",
                self.vocab_size,
                vocab_limit,
            )

    def answer(self, batch: PayloadBatch, k: int, temperature: float, vocab_limit: int) -> None:
        """Per position: the engine's top-N ranked (log-prob desc, id asc), cut to k; the
        realised token's log-prob; log-probs at the student's ids where the engine gave one.
        entropy stays NaN: the engine does not report it."""
        count = self.top_logprobs or k
        ids, requested, spans = batch.ids, batch.requested.numpy(), batch.spans
        for start in range(0, len(spans), self.max_sequences_per_request):
            group = spans[start : start + self.max_sequences_per_request]
            tables = self._score([batch.sequence(span).tolist() for span in group], count)
            for (row, begin, end, first), sequence_tables in zip(group, tables):
                for t in range(first, end - 1):
                    table = sequence_tables[t - begin]
                    realised = int(ids[row, t + 1])
                    if realised not in table:
                        raise TeacherProtocolError(
                            f"{self.url}: no log-prob for the realised token {realised}"
                        )
                    ranked = sorted(table.items(), key=lambda item: (-item[1], item[0]))[:k]
                    if len(ranked) < k:
                        raise TeacherProtocolError(
                            f"{self.url}: {len(ranked)} log-probs at a position, need k={k}"
                        )
                    top_ids = [token for token, _ in ranked]
                    if max(top_ids) >= vocab_limit:
                        raise ValueError(
                            f"the engine's top-{k} holds id {max(top_ids)} >= the shared "
                            f"vocabulary {vocab_limit} (a padded row)"
                        )
                    batch.fill(
                        row,
                        t,
                        topk_ids=top_ids,
                        topk_log_probs=[value for _, value in ranked],
                        sampled_log_probs=table[realised],
                        requested_log_probs=[
                            table.get(int(token), math.nan) for token in requested[row, t]
                        ],
                    )
