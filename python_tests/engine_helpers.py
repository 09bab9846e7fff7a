"""References shared by the rollout-engine tests (test_rollout_engines.py, which runs in the
main environment, and test_vllm_engine.py, which runs in the vLLM one)."""

from __future__ import annotations

import torch


def reference_sampling_log_probs(logits, ids, temperature, top_p, vocab_limit):
    """log-prob of ids under the distribution the engines sample from: columns >= vocab_limit
    removed, logits / temperature, then the smallest set of top tokens whose mass reaches
    top_p (ties kept), renormalised. logits: (N, V) float64; ids: (N,)."""
    scaled = logits[:, :vocab_limit].double() / temperature
    probs = scaled.softmax(-1)
    out = []
    for row in range(scaled.shape[0]):
        order = probs[row].argsort(descending=True)
        cumulative = probs[row][order].cumsum(0)
        # The token crossing top_p stays in (all of them at top_p = 1, rounding aside).
        keep = len(order) if top_p >= 1 else min(int((cumulative < top_p).sum()) + 1, len(order))
        threshold = probs[row][order[keep - 1]]
        nucleus = probs[row] >= threshold
        picked = int(ids[row])
        assert nucleus[picked], "sampled a token outside the nucleus"
        out.append(float(torch.log(probs[row][picked] / probs[row][nucleus].sum())))
    return torch.tensor(out, dtype=torch.float64)


def forward_logits(model, batch):
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits[:, :-1]
