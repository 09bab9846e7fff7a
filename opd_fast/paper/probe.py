"""opd-fast probe: before training, how compatible is each teacher with the student?

Samples student rollouts on a few prompts (per prompt template) and scores them with each
teacher: initial overlap ratio, overlap mass, overlap-token advantage and entropy gap (the
paper's predictors of whether OPD will work), plus the AUROC of the sequence mean reward.
Writes probe.json, probe.md (a side-by-side table) and probe.png.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from opd_fast.models.loading import Placement
from opd_fast.paper.diagnostics import score_rollouts, sequence_auroc
from opd_fast.teachers.factory import TeacherSpec
from opd_fast.training.data import load_examples
from opd_fast.training.health import COMPATIBLE_OVERLAP, verdict
from opd_fast.training.pair import load_student
from opd_fast.training.rollouts import SamplingSettings, sample_examples
from opd_fast.training.rollouts.hf import HFEngine


@dataclass(frozen=True)
class ProbeSettings:
    num_prompts: int = 32
    rollouts_per_prompt: int = 2
    max_new_tokens: int = 256
    k: int = 16
    temperature: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"


def probe(
    student_dir: str,
    teacher_dirs: list[str],
    prompts_path: str,
    templates: list[str] | None = None,
    settings: ProbeSettings = ProbeSettings(),
) -> list[dict]:
    """One row per (teacher, template) with the initial OPD metrics and a verdict."""
    templates = templates or ["{prompt}"]
    placement = Placement.resolve(settings.device, settings.dtype)
    student = load_student(student_dir, placement, trainable=False)
    examples = load_examples(prompts_path)[: settings.num_prompts]
    rows = []
    for teacher_dir in teacher_dirs:
        pair = student.with_teacher(TeacherSpec(path=teacher_dir, batch_size=16), k=settings.k)
        for template in templates:
            torch.manual_seed(settings.seed)  # every teacher sees the same student rollouts
            batch, repeated = sample_examples(
                HFEngine(pair.student, pair.tokenizer),
                pair.tokenizer,
                examples,
                repeats=settings.rollouts_per_prompt,
                template=template,
                settings=SamplingSettings(
                    eos_ids=tuple(pair.eos_ids),
                    max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                ),
            )
            answers = [e.answer for e in repeated]
            scored = score_rollouts(
                pair, batch, answers, k=settings.k, temperature=settings.temperature
            )
            metrics = scored.metrics
            rows.append(
                {
                    "teacher": teacher_dir,
                    "template": template,
                    "overlap_ratio": metrics["overlap_ratio"],
                    "overlap_mass_student": metrics["overlap_mass_student"],
                    "overlap_mass_teacher": metrics["overlap_mass_teacher"],
                    "overlap_token_advantage": metrics["overlap_token_advantage"],
                    "entropy_gap": metrics["entropy_gap"],
                    "student_topk_mass": metrics["student_topk_mass"],
                    "student_accuracy": sum(scored.correct) / len(scored.correct),
                    "sequence_reward_auroc": sequence_auroc(scored),
                    "response_tokens": metrics["response_tokens"],
                    "verdict": verdict(metrics["overlap_ratio"]),
                }
            )
        del pair  # the next teacher's memory
    return rows


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    columns = [
        "teacher",
        "template",
        "overlap_ratio",
        "overlap_mass_student",
        "overlap_token_advantage",
        "entropy_gap",
        "student_accuracy",
        "sequence_reward_auroc",
        "verdict",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def plot_probe(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{os.path.basename(r['teacher'].rstrip('/'))}\n{r['template'][:24]}" for r in rows]
    panels = [
        ("overlap_ratio", COMPATIBLE_OVERLAP),
        ("overlap_mass_student", None),
        ("overlap_token_advantage", None),
        ("entropy_gap", None),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for axis, (name, line) in zip(axes, panels):
        axis.bar(range(len(rows)), [r[name] for r in rows], color="tab:blue")
        if line is not None:
            axis.axhline(line, color="gray", linestyle="--", label="compatible")
            axis.legend(fontsize=8)
        axis.set_xticks(range(len(rows)), labels, fontsize=7, rotation=20)
        axis.set_title(name)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_probe(rows: list[dict], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "probe.json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    with open(os.path.join(out_dir, "probe.md"), "w") as handle:
        handle.write(markdown_table(rows) + "\n")
    plot_probe(rows, os.path.join(out_dir, "probe.png"))
