"""A causal LM split at its output layer: the decoder that ends in the final hidden states,
and the linear layer (weight, bias) that turns them into logits. The fused linear loss
(opd_fast.op.linear) needs the two apart so that the (B, T, V) logits are never formed."""

from __future__ import annotations

import torch

# Config entries of models whose logits are not a plain linear function of the last hidden
# states (Gemma 2's soft-capping, Cohere's and Granite's scaling): they keep the logits path.
_NONLINEAR_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def nonlinear_head_reason(model) -> str | None:
    """Why `model`'s logits are not hidden_states @ weight.T + bias, or None when they are."""
    config = getattr(model, "config", None)
    for key in _NONLINEAR_HEAD_KEYS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            return f"its config sets {key}={value}"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its output layer is a {type(head).__name__}, not a torch.nn.Linear"
    decoder = model.get_decoder()
    if decoder is model:
        return "it has no separate decoder (get_decoder() returns the model itself)"
    return None


def output_layer(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V_rows, H), bias (V_rows,) or None) of the output layer, tied or not."""
    head = model.get_output_embeddings()
    return head.weight, head.bias


def last_hidden_states(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """(B, L) ids -> (B, L, H) final hidden states (after the final norm): what the output
    layer reads, without calling it."""
    output = model.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return output.last_hidden_state
