"""Hugging Face causal LMs as opd_fast uses them: loading from local directories (`loading`:
device, dtype, attention, weights, tokenizer), what a student and teacher must share
(`vocabulary`: one tokenizer, the shared logit columns, the EOS ids), a model split at its
output layer (`output_layer`: final hidden states, lm_head weight and bias), and token
sequences padded for one forward (`batch`).

Imports: torch and transformers only, nothing else of opd_fast.
"""
