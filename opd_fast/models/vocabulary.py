"""What a student and its teacher must share: one tokenizer, the logit columns both have,
and the ids that end a response."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the token -> id map and special tokens: equal fingerprints, same tokenizer."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
        },
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def check_tokenizers_match(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError unless both tokenizers map every token to the same id."""
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    only_student = sorted(set(student_vocab) - set(teacher_vocab))[:5]
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab))[:5]
    remapped = [
        t for t in student_vocab if t in teacher_vocab and student_vocab[t] != teacher_vocab[t]
    ]
    raise ValueError(
        "student and teacher tokenizers differ: "
        f"{len(student_vocab)} vs {len(teacher_vocab)} tokens; only in student: {only_student}; "
        f"only in teacher: {only_teacher}; same token, different id: {remapped[:5]}. "
        "OPD compares distributions over the same vocabulary, so both must use one tokenizer."
    )


def output_rows(model) -> int:
    """Rows of a model's output embedding (its logit columns)."""
    return model.get_output_embeddings().weight.shape[0]


def shared_vocab_size(student_rows: int, teacher_rows: int, tokenizer) -> int:
    """Logit columns both models share, from their output row counts (a remote teacher reports
    its own). Embedding tables are often padded past the tokenizer (e.g. 151,936 vs 152,064):
    that padding is dropped; anything else is an error."""
    shared = min(student_rows, teacher_rows)
    if shared < len(tokenizer):
        raise ValueError(
            f"vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but the student has "
            f"{student_rows} and the teacher {teacher_rows} output rows"
        )
    return shared


def eos_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)
