"""Hugging Face causal LMs as opd_fast uses them: loading from local directories (`loading`:
device, dtype, attention, weights, tokenizer) and what a student and teacher must share
(`vocabulary`: one tokenizer, the shared logit columns, the EOS ids).

Imports: torch and transformers only, nothing else of opd_fast.
"""
