"""The graded toy world (ToyWorldSpec.graded_values, opd_fast.toy.spec.WORLDS["graded"]): the
student half-knows the entities it was not taught. And the default world is what it was."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections import Counter

import pytest
import torch

from opd_fast.toy import ToyWorldSpec, TrainSpec, data, toy_assets
from opd_fast.toy.spec import WORLDS, world_spec
from opd_fast.toy.tokenizer import entity_name

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_toy_world import TINY, TINY_ARCH  # noqa: E402

TINY_GRADED = dataclasses.replace(TINY, graded_values=(0.3, 0.5, 0.2), teacher_phrasing_shift=0)

# The default world as it was before graded_values existed (commit 8e67c04): its cache key, and
# a digest of its facts, the first 300 examples of the student's and the teacher's training
# streams, and both prompt splits.
DEFAULT_KEY = "world-v2-ed5ed27be18c877c"
DEFAULT_DATA_DIGEST = "ad105533552a57f5fc6e2216cfdd9d15fb00f0a6d01da4d0140b75589000b742"


def _default_data_digest(spec: ToyWorldSpec) -> str:
    facts = data.make_facts(spec)
    blob = json.dumps(
        [
            facts.values,
            facts.student_known,
            facts.eval_operands,
            data.training_stream(spec, facts, "subset", "chain", 300),
            data.training_stream(spec, facts, "all", "chain", 300, spec.teacher_phrasing_shift),
            data.prompt_rows(spec, facts, "train"),
            data.prompt_rows(spec, facts, "eval"),
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def test_default_world_is_unchanged():
    spec = ToyWorldSpec()
    assert world_spec("default") == spec and spec.graded_values == ()
    assert spec.key() == DEFAULT_KEY
    assert "graded_values" not in spec.to_dict()
    assert data.make_facts(spec).decoys == ()
    assert _default_data_digest(spec) == DEFAULT_DATA_DIGEST


def test_graded_spec_fields_and_validation():
    graded = world_spec("graded")
    assert set(WORLDS) == {"default", "graded", "graded_drift", "no_drift"}
    # the ablation worlds take one of graded's two changes each
    default = world_spec("default")
    assert world_spec("graded_drift") == dataclasses.replace(graded, teacher_phrasing_shift=4)
    assert world_spec("graded_drift").teacher_phrasing_shift == default.teacher_phrasing_shift
    assert world_spec("no_drift") == dataclasses.replace(default, teacher_phrasing_shift=0)
    assert len({world_spec(name).key() for name in WORLDS}) == len(WORLDS)
    assert graded.graded_values == (0.3, 0.5, 0.2) and graded.teacher_phrasing_shift == 0
    assert graded.key() != DEFAULT_KEY
    assert graded.to_dict()["graded_values"] == [0.3, 0.5, 0.2]
    again = ToyWorldSpec.from_dict(json.loads(json.dumps(graded.to_dict())))
    assert again == graded and hash(again) == hash(graded) and again.key() == graded.key()
    for bad in ((1.0,), (0.5, 0.6), (0.5, 0.5, 0.0), (0.1,) * 11):
        with pytest.raises(ValueError, match="graded_values"):
            dataclasses.replace(graded, graded_values=bad)
    with pytest.raises(ValueError, match="unknown toy world"):
        world_spec("nope")


def test_graded_facts_keep_the_default_facts_and_add_decoys():
    graded = world_spec("graded")
    facts = data.make_facts(graded)
    default = data.make_facts(ToyWorldSpec())
    assert (facts.values, facts.student_known, facts.eval_operands) == (
        default.values,
        default.student_known,
        default.eval_operands,
    )
    known = set(facts.student_known)
    for entity, decoys in enumerate(facts.decoys):
        if entity in known:
            assert decoys == ()
        else:
            assert len(decoys) == 2 and len(set(decoys)) == 2
            assert facts.values[entity] not in decoys
            assert all(0 <= d < graded.n_values for d in decoys)
    assert data.make_facts(graded) == facts  # deterministic


def test_graded_student_data_has_graded_values():
    graded = world_spec("graded")
    facts = data.make_facts(graded)
    known = set(facts.student_known)
    stream = data.training_stream(graded, facts, "subset", "chain", 8_000)
    assert stream == data.training_stream(graded, facts, "subset", "chain", 8_000)
    seen: dict[int, Counter] = {}
    for prompt, response in stream:
        if prompt.startswith("repeat"):
            continue
        entity, value = int(prompt.split()[2][1:]), int(response.split()[2])
        seen.setdefault(entity, Counter())[value] += 1
    assert set(seen) == set(range(graded.n_entities))  # now every entity has worked examples
    pooled = Counter()
    for entity, counts in seen.items():
        if entity in known:
            assert set(counts) == {facts.values[entity]}
            continue
        candidates = [facts.values[entity], *facts.decoys[entity]]
        assert set(counts) <= set(candidates)
        total = sum(counts.values())
        for rank, value in enumerate(candidates):
            pooled[rank] += counts[value] / total
    unknown = graded.n_entities - len(known)
    shares = [pooled[rank] / unknown for rank in range(3)]
    # the decoy first, the true value second, the other decoy third
    assert shares[1] > shares[0] > shares[2] > 0.1
    assert all(abs(s - w) < 0.05 for s, w in zip(shares, graded.graded_values))
    # The teachers' data does not depend on graded_values.
    plain = dataclasses.replace(graded, graded_values=())
    for knows, pattern in (("all", "chain"), ("all", "other")):
        assert data.training_stream(graded, facts, knows, pattern, 500) == (
            data.training_stream(plain, data.make_facts(plain), knows, pattern, 500)
        )


def _weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_tiny_graded_world_builds_deterministically(tmp_path):
    first = toy_assets(TINY_GRADED, cache_dir=str(tmp_path / "a"), progress=False)
    second = toy_assets(TINY_GRADED, cache_dir=str(tmp_path / "b"), progress=False)
    for name in ("student_dir", "teacher_dir"):
        a, b = _weights(getattr(first, name)), _weights(getattr(second, name))
        assert a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)
    world = first.world
    facts = data.make_facts(TINY_GRADED)
    assert world["decoys"] == {entity_name(e): list(d) for e, d in enumerate(facts.decoys) if d}
    assert world["spec"]["graded_values"] == [0.3, 0.5, 0.2]
    assert ToyWorldSpec.from_dict(world["spec"]) == TINY_GRADED
    plain = toy_assets(
        dataclasses.replace(TINY_GRADED, graded_values=()),
        cache_dir=str(tmp_path / "a"),
        progress=False,
        build_default_models=False,
    )
    assert "decoys" not in plain.world and "graded_values" not in plain.world["spec"]


def test_student_learns_graded_mass(tmp_path):
    """A student trained long enough on a small graded world puts real mass on both its
    favourite (a decoy) and the true value of an entity it was not taught."""
    from opd_fast.models.loading import CPU_FP32, load_model
    from opd_fast.toy.build import build_model
    from opd_fast.toy.tokenizer import build_tokenizer

    spec = dataclasses.replace(
        TINY_GRADED,
        n_entities=8,
        student_arch=dataclasses.replace(TINY_ARCH, hidden_size=64, head_dim=32),
        student_train=TrainSpec(steps=300, batch_size=32, lr=1e-2, warmup_steps=10),
    )
    assets = toy_assets(spec, cache_dir=str(tmp_path), progress=False, build_default_models=False)
    out = str(tmp_path / "student")
    build_model(spec, assets.root, "student", out, progress=False)
    model = load_model(out, CPU_FP32, trainable=False)
    tokenizer = build_tokenizer(spec)
    facts = data.make_facts(spec)
    digits = [tokenizer.convert_tokens_to_ids(str(v)) for v in range(spec.n_values)]
    true_mass, decoy_mass, rest_mass = [], [], []
    for entity in range(spec.n_entities):
        if entity in facts.student_known:
            continue
        # "<bos> what is eXXX plus 0 ? eXXX is" -> the next token is the recalled value.
        text = data.prompt_text(entity, 0) + f" {entity_name(entity)} is"
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1], -1)
        true_mass.append(probs[digits[facts.values[entity]]].item())
        decoy_mass.append(probs[digits[facts.decoys[entity][0]]].item())
        candidates = {facts.values[entity], *facts.decoys[entity]}
        rest = [probs[digits[v]].item() for v in range(spec.n_values) if v not in candidates]
        rest_mass.append(max(rest))
    mean_true = sum(true_mass) / len(true_mass)
    mean_decoy = sum(decoy_mass) / len(decoy_mass)
    mean_rest = sum(rest_mass) / len(rest_mass)
    # graded: a wrong but plausible value first, the true one well above any non-candidate
    assert mean_decoy > 0.3 and mean_decoy > mean_true > max(0.05, 3 * mean_rest)


def test_repro_world_option(tmp_path):
    from opd_fast.cli import main
    from opd_fast.paper.repro import run_repro

    with pytest.raises(ValueError, match="unknown toy world"):  # before any world is built
        run_repro(out_dir=str(tmp_path / "repro"), world="nope")
    with pytest.raises(SystemExit):
        main(["repro", "--world", "nope", "--out", str(tmp_path / "repro")])
    assert not (tmp_path / "repro").exists()
