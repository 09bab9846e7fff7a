"""A causal LM split at its output layer: the decoder that ends in the final hidden states,
and the linear layer (weight, bias) that turns them into logits. The fused linear loss
(opd_fast.op.linear) needs the two apart so that the (B, T, V) logits are never formed.

A model sharded with FSDP2 gathers its root's own parameters (embeddings, final norm, output
layer) only inside a forward: `with_root_parameters` runs any function of the model inside one
(a method registered with FSDP's forward hooks), so that the decoder and the output layer can
be used without calling forward()."""

from __future__ import annotations

import types
from collections.abc import Callable

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


# A method of an FSDP2 root that runs a function inside the root's forward hooks.
ROOT_CALL = "opd_fast_root_call"


def _root_call(self, fn: Callable, *args, **kwargs):
    return fn(self, *args, **kwargs)


def register_root_call(model: torch.nn.Module) -> None:
    """Give an FSDP2-sharded model a forward method that runs any function of the model
    (with_root_parameters): FSDP gathers the root's own parameters (the embeddings, the final
    norm, the output layer) for it, as for forward(), and reduce-scatters their gradients in
    the backward like any other."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, ROOT_CALL, types.MethodType(_root_call, model))
    register_fsdp_forward_method(model, ROOT_CALL)


def has_root_call(model: torch.nn.Module) -> bool:
    """True for a model sharded with FSDP2 here (register_root_call)."""
    return hasattr(model, ROOT_CALL)


def with_root_parameters(model: torch.nn.Module, fn: Callable, *args, **kwargs):
    """fn(model, *args, **kwargs) where the model's own parameters are whole: through the
    registered root call under FSDP2, directly otherwise. What the fused linear loss path
    runs the decoder, the output layer and the loss in, since it does not call forward()."""
    if not has_root_call(model):
        return fn(model, *args, **kwargs)
    return getattr(model, ROOT_CALL)(fn, *args, **kwargs)
