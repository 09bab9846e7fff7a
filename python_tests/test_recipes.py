"""Recipes and diagnostics: probe, cold start (SFT), dedup, AUROC, position profiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from opd_fast.paper.dedup import deduplicate, jaccard, shingles
from opd_fast.paper.diagnostics import auroc
from opd_fast.paper.probe import ProbeSettings, probe, verdict
from opd_fast.toy.tiny import tiny_setup
from opd_fast.training.cold_start import repeated_ngram_fraction
from opd_fast.training.metrics import PositionProfile
from opd_fast.training.trainer import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tiny")), teacher_vocab_padding=32)


def test_auroc_matches_hand_computed_values():
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), [True, True, False, False]) == 1.0
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), [True, True, False, False]) == 0.0
    # one tie between a positive and a negative counts half: (1 + 0.5 + 1 + 1) / 4
    assert auroc(torch.tensor([0.5, 0.9, 0.5, 0.1]), [True, True, False, False]) == 0.875
    assert auroc(torch.tensor([0.1, 0.2]), [True, True]) is None


def test_position_profile_buckets_by_offset_from_response_start():
    profile = PositionProfile(span=4, chunks=2)
    mask = torch.tensor([[False, True, True, True, True], [False, False, True, True, False]])
    values = torch.tensor([[9.0, 1.0, 1.0, 3.0, 3.0], [9.0, 9.0, 1.0, 1.0, 9.0]])
    profile.add({"m": values}, mask)
    assert profile.means() == {"m": [1.0, 3.0]}


def test_dedup_exact_near_and_held_out():
    prompts = [
        "Solve x + 1 = 2 for x.",
        "solve x+1=2 for x",
        "a b c d e f g h",
        "a b c d e f g i",
        "held out prompt text here",
    ]
    result = deduplicate(prompts, against=["Held out prompt text here!"], threshold=0.7)
    assert result.kept == ["Solve x + 1 = 2 for x.", "a b c d e f g h"]
    reasons = [reason for _, reason, _ in result.removed]
    assert reasons[0].startswith("exact duplicate") and "held-out" in reasons[-1]
    assert jaccard(shingles("a b c d e f g h"), shingles("a b c d e f g i")) >= 0.7


def test_repetition_filter():
    assert repeated_ngram_fraction(list(range(20))) == 0.0
    assert repeated_ngram_fraction([1, 2] * 20) > 0.8


def test_verdict_thresholds():
    assert verdict(0.9).startswith("compatible")
    assert verdict(0.6).startswith("weak")
    assert verdict(0.2).startswith("incompatible")


def test_probe_ranks_an_identical_teacher_as_compatible(tiny, tmp_path):
    rows = probe(
        tiny["student"],
        [tiny["student"], tiny["teacher"]],
        tiny["train_data"],
        ["{prompt}", "question : {prompt}"],
        ProbeSettings(num_prompts=4, rollouts_per_prompt=1, max_new_tokens=6),
    )
    assert len(rows) == 4
    same = [r for r in rows if r["teacher"] == tiny["student"]]
    assert all(r["overlap_ratio"] == pytest.approx(1.0) for r in same)
    assert all(r["entropy_gap"] == pytest.approx(0.0, abs=1e-5) for r in same)
    assert all(r["verdict"].startswith("compatible") for r in same)
    other = [r for r in rows if r["teacher"] == tiny["teacher"]]
    assert all(r["overlap_ratio"] < 0.5 for r in other)  # unrelated random models


def test_cold_start_phase_runs_before_opd(tiny, tmp_path):
    run_dir = str(tmp_path / "run")
    train(
        dict(
            **tiny,
            run_dir=run_dir,
            steps=1,
            prompts_per_step=4,
            rollouts_per_prompt=2,
            max_new_tokens=40,
            micro_batch_size=4,
            cold_start_steps=2,
            cold_start_batch_size=2,
            cold_start_responses_per_prompt=4,
            cold_start_lr=1e-3,
            progress=False,
            eval_every=0,
            checkpoint_every=0,
        )
    )
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        kinds = [json.loads(line)["kind"] for line in handle]
    assert kinds[:3] == ["eval", "cold_start", "eval"] and "train" in kinds
    assert os.path.exists(os.path.join(run_dir, "cold_start_model", "cold_start.json"))


def test_cli_probe_and_diagnose(tiny, tmp_path):
    out = str(tmp_path / "probe")
    command = [sys.executable, "-m", "opd_fast.cli"]
    subprocess.run(
        command
        + [
            "probe",
            "--student",
            tiny["student"],
            "--teacher",
            tiny["teacher"],
            "--prompts",
            tiny["train_data"],
            "--num-prompts",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            out,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert {"probe.json", "probe.md", "probe.png"} <= set(os.listdir(out))
    run_dir = str(tmp_path / "run")
    train(
        dict(
            **tiny,
            run_dir=run_dir,
            steps=2,
            prompts_per_step=2,
            rollouts_per_prompt=2,
            max_new_tokens=6,
            micro_batch_size=4,
            progress=False,
            eval_every=0,
            checkpoint_every=0,
        )
    )
    diagnose_dir = str(tmp_path / "diagnose")
    subprocess.run(
        command
        + [
            "diagnose",
            "--run",
            run_dir,
            "--student",
            tiny["student"],
            "--teacher",
            tiny["teacher"],
            "--prompts",
            tiny["train_data"],
            "--num-prompts",
            "2",
            "--rollouts",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            diagnose_dir,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    with open(os.path.join(diagnose_dir, "diagnose.json")) as handle:
        report = json.load(handle)
    assert "prefix_advantage" in report and "position_profile" in report
    assert os.path.exists(os.path.join(diagnose_dir, "position_heatmaps.png"))


def test_repro_loss_table_names_the_best_loss_and_its_cost():
    from opd_fast.paper.repro import loss_table

    def runs(gaps, step):
        return [
            {"gap_recovery": g, "student_acc_after": 0.9, "overlap_ratio_first": 0.7,
             "overlap_ratio_last": 0.8, "step_seconds_median": step,
             "score_seconds_median": step / 2, "train_peak_memory_mib": 900.0}
            for g in gaps
        ]  # fmt: skip

    results = {
        "teacher": runs([0.80, 0.82, 0.84], 2.0),
        "full_vocab": runs([0.90, 0.91, 0.92], 3.0),
        "sampled_token": runs([0.30, 0.50, 0.40], 1.5),
    }
    text = "\n".join(loss_table(results))
    assert "| full_vocab | full_vocab | exact | 0.910 ± 0.010 |" in text
    assert "| sampled_token | sampled_token | pg |" in text and "3.00 ± 0.00" in text
    assert "Highest mean gap recovery: full_vocab, ahead of teacher" in text
    results["full_vocab"] = runs([0.95, 0.80, 0.88], 3.0)  # a lead inside the seed spread
    assert "not clearly ahead of teacher" in "\n".join(loss_table(results))
    assert loss_table({"teacher": results["teacher"]}) == []  # nothing to compare


def test_repro_judge_needs_spread_to_call_a_finding_reproduced():
    from opd_fast.paper.repro import judge

    assert judge([0.8, 0.7, 0.75], [0.1, 0.2, 0.15])[0] == "reproduced"
    assert judge([0.8, 0.1, 0.5], [0.4, 0.3, 0.45])[0].startswith("not reproduced")
    assert judge([0.1, 0.15, 0.12], [0.8, 0.7, 0.75])[0] == "opposite"
    assert "1 seed" in judge([0.8], [0.1])[0]
    assert judge([None], [0.1])[0].startswith("undefined")


def test_repro_judge_keeps_asks_for_the_reference_within_the_spread():
    from opd_fast.paper.repro import FINDINGS, judge_keeps

    # Student Top-k 0.875 +- 0.028 on the default world: 0.80 keeps nearly all of it (91%);
    # the default world's Overlap (0.678 +- 0.212) falls short within its own spread; the
    # graded world's (-0.184 +- 0.574 against 0.531 +- 0.084) beyond it.
    student = [0.85, 0.87, 0.905]
    assert judge_keeps([0.78, 0.80, 0.82], student)[0] == "reproduced"
    assert judge_keeps([0.95, 0.96, 0.97], student)[0] == "reproduced"  # above it
    assert judge_keeps([0.44, 0.76, 0.84], student)[0] == "not reproduced (within seed spread)"
    assert judge_keeps([0.068, 0.221, -0.841], [0.489, 0.628, 0.477])[0] == "not reproduced"
    assert judge_keeps([0.70, 0.71, 0.72], student)[0] == "not reproduced"
    assert "1 seed" in judge_keeps([0.8], [0.9])[0]
    # (c)'s rows compare what their labels say: Overlap against Student Top-k ("teacher") and
    # against Non-Overlap, each with its own test.
    rows = {finding: (winner, loser, test) for _, finding, winner, loser, *_, test in FINDINGS}
    assert rows["overlap keeps student top-k's benefit"] == ("overlap_topk", "teacher", "keeps")
    assert rows["overlap vs non-overlap top-k"] == ("overlap_topk", "nonoverlap_topk", "beats")
