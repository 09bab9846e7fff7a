"""Hugging Face causal LMs as opd_fast uses them: loading from local directories (`loading`:
device, dtype, attention, weights, tokenizer), models and data sets by Hub name through the
Hugging Face cache (`hub`), what a student and teacher must share
(`vocabulary`: one tokenizer, the shared logit columns, the EOS ids), a model split at its
output layer (`output_layer`: final hidden states, lm_head weight and bias), and token
sequences padded for one forward (`batch`).

Imports: torch, transformers and huggingface_hub only, nothing else of opd_fast.
"""
