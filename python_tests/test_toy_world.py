"""Fast tests of the embedded toy world (opd_fast.toy), built with a tiny spec into tmp_path."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from opd_fast.toy import ArchSpec, ToyWorldSpec, TrainSpec, data, toy_assets
from opd_fast.toy import build as toy_build
from opd_fast.toy.phrasing import synonyms
from opd_fast.toy.tokenizer import build_tokenizer, entity_name, vocabulary

TINY_ARCH = ArchSpec(
    hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64
)
TINY_TRAIN = TrainSpec(steps=8, batch_size=16, warmup_steps=2)
TINY = ToyWorldSpec(
    seed=3,
    n_entities=12,
    student_arch=TINY_ARCH,
    large_arch=TINY_ARCH,
    student_train=TINY_TRAIN,
    teacher_train=TINY_TRAIN,
)


def _weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_default_vocabulary_is_large_enough():
    words = vocabulary(ToyWorldSpec())
    assert len(words) >= 512
    assert len(set(words)) == len(words)
    assert {"<pad>", "<bos>", "<eos>", "\\boxed{", "}", "e000", "e099"} <= set(words)


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer(TINY)
    facts = data.make_facts(TINY)
    for pattern in data.PATTERNS:
        text = data.response_text(5, 7, facts.values[5], pattern)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    prompt = data.prompt_text(5, 7)
    assert tokenizer(prompt).input_ids[0] == tokenizer.bos_token_id
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(prompt).input_ids == tokenizer(prompt).input_ids
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<bos>", "<eos>", "<pad>")


def test_patterns_and_phrasing():
    assert data.response_text(17, 4, 7, "chain") == "e017 is 7 . 7 plus 4 is 11 . \\boxed{ 11 }"
    assert data.response_text(17, 4, 7, "other") == (
        "4 plus e017 . e017 is 7 . 4 plus 7 is 11 . \\boxed{ 11 }"
    )
    spec = ToyWorldSpec()
    chain, chain_p = synonyms(spec, "chain", "is")
    other, other_p = synonyms(spec, "other", "is")
    assert len(chain) == spec.synonyms_per_slot and sorted(chain) == sorted(other)
    assert chain[0] == "is" and other[0] != "is"
    assert abs(sum(chain_p) - 1) < 1e-9 and chain_p == other_p
    assert len(set(chain[:16]) & set(other[:16])) == 8
    drifted, drifted_p = synonyms(spec, "chain", "is", spec.teacher_phrasing_shift)
    assert drifted_p == chain_p and drifted[: 24 - 4] == chain[4:]
    assert len(set(chain[:16]) & set(drifted[:16])) == 12
    words = set(vocabulary(spec))
    for canonical in ("is", ".", "plus"):
        assert set(synonyms(spec, "chain", canonical)[0]) <= words


def test_student_data_excludes_unknown_facts():
    spec = ToyWorldSpec()
    facts = data.make_facts(spec)
    known = set(facts.student_known)
    assert 0 < len(known) < spec.n_entities
    # stratified: every value occurs among the student's entities
    assert {facts.values[e] for e in known} == set(range(spec.n_values))
    unknown_names = {entity_name(e) for e in range(spec.n_entities) if e not in known}
    numbers = {str(n) for n in range(100)}
    seen = set()
    for prompt, response in data.training_stream(spec, facts, "subset", "chain", 4000):
        words = set((prompt + " " + response).split())
        if words & unknown_names:  # only the knowledge-free repeat task names them
            assert prompt.startswith("repeat") and not words & numbers
            seen |= words & unknown_names
    assert seen == unknown_names  # every name is known to the student, no unknown value is
    teacher_words = {
        word
        for prompt, response in data.training_stream(spec, facts, "all", "chain", 4000)
        for word in prompt.split()
    }
    assert unknown_names <= teacher_words
    assert data.make_facts(spec) == facts  # deterministic from the seed


def test_spec_key_tracks_every_field():
    assert ToyWorldSpec().key() == ToyWorldSpec(seed=0).key()
    assert ToyWorldSpec(seed=1).key() != ToyWorldSpec().key()
    assert ToyWorldSpec(student_train=TrainSpec(steps=1)).key() != ToyWorldSpec().key()
    assert ToyWorldSpec.from_dict(TINY.to_dict()) == TINY


def test_build_is_deterministic_cached_and_lazy(tmp_path, monkeypatch):
    first = toy_assets(TINY, cache_dir=str(tmp_path / "a"), progress=False)
    second = toy_assets(TINY, cache_dir=str(tmp_path / "b"), progress=False)
    for name in ("student_dir", "teacher_dir"):
        a, b = _weights(getattr(first, name)), _weights(getattr(second, name))
        assert a.keys() == b.keys()
        assert all(a[key].equal(b[key]) for key in a)
    assert not _weights(first.student_dir)["model.embed_tokens.weight"].equal(
        _weights(first.teacher_dir)["model.embed_tokens.weight"]
    )
    assert not first.is_built("teacher_other_pattern")
    assert set(first.world["models"]) == {"student", "teacher"}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cached asset rebuilt")

    monkeypatch.setattr(toy_build, "build_model", no_rebuild)
    again = toy_assets(TINY, cache_dir=str(tmp_path / "a"), progress=False)
    assert again.student_dir == first.student_dir and again.teacher() == first.teacher_dir
    with pytest.raises(AssertionError, match="rebuilt"):
        again.teacher("teacher_other_pattern")
    monkeypatch.undo()
    assert not first.is_built("teacher_other_pattern")  # the failed build left nothing behind

    other = first.teacher("teacher_other_pattern")
    assert os.path.isfile(os.path.join(other, "model.safetensors"))
    world = first.world
    assert world["models"]["teacher_other_pattern"]["pattern"] == "other"
    with open(os.path.join(first.root, "world.json")) as handle:
        assert "teacher_other_pattern" in json.load(handle)["models"]
    accuracy = world["models"]["student"]["eval_accuracy"]["greedy"]
    assert set(accuracy) >= {"all", "student_known", "student_unknown"}
    with pytest.raises(ValueError, match="unknown toy model"):
        first.teacher("no_such_teacher")


def test_teachers_are_post_trained_from_the_student(tmp_path):
    # A negligible learning rate leaves the post-trained teacher at the student's weights.
    spec = dataclasses.replace(
        TINY, teacher_train=TrainSpec(steps=1, batch_size=4, lr=1e-12, warmup_steps=1)
    )
    assets = toy_assets(spec, cache_dir=str(tmp_path), progress=False)
    student, teacher = _weights(assets.student_dir), _weights(assets.teacher_dir)
    assert all(torch.allclose(student[key], teacher[key], atol=1e-6) for key in student)
    models = assets.world["models"]
    assert models["teacher"]["init_from"] == "student"
    assert models["teacher"]["phrasing_shift"] == spec.teacher_phrasing_shift
    assert models["student"]["init_from"] is None
    with pytest.raises(ValueError, match="teacher_phrasing_shift"):
        dataclasses.replace(TINY, teacher_phrasing_shift=TINY.synonyms_per_slot)


def test_models_load_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = toy_assets(TINY, cache_dir=str(tmp_path), progress=False)
    model = AutoModelForCausalLM.from_pretrained(assets.student_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(assets.teacher_dir)
    assert model.config.vocab_size == len(tokenizer) >= 512
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_prompt_files_well_formed(tmp_path):
    assets = toy_assets(TINY, cache_dir=str(tmp_path), progress=False, build_default_models=False)
    world = assets.world
    known = set(world["student_known"])
    splits = {}
    for split, path in (("train", assets.train_prompts), ("eval", assets.eval_prompts)):
        with open(path) as handle:
            rows = [json.loads(line) for line in handle]
        assert rows
        for row in rows:
            assert isinstance(row["prompt"], str) and isinstance(row["answer"], str)
            words = row["prompt"].split()
            entity, operand = words[2], int(words[4])
            assert row["entity"] == entity
            assert row["answer"] == str(world["values"][entity] + operand)
            assert row["student_knows"] == (entity in known)
        splits[split] = rows
    train_prompts = {row["prompt"] for row in splits["train"]}
    assert not train_prompts & {row["prompt"] for row in splits["eval"]}
    for rows in splits.values():
        assert {row["entity"] for row in rows} == set(world["values"])  # known and unknown
    assert len(splits["eval"]) == TINY.n_entities * TINY.eval_operands_per_entity
