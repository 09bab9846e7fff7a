"""dynamics.png: accuracy and the paper's OPD dynamics (overlap ratio, overlap-token advantage,
entropy gap, overlap mass) over training steps."""

from __future__ import annotations

from typing import Any


def plot_dynamics(records: list[dict[str, Any]], path: str, title: str = "OPD dynamics") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    panels = [
        ("student accuracy", evals, ["student_accuracy"]),
        ("overlap ratio", train, ["overlap_ratio"]),
        ("overlap-token advantage", train, ["overlap_token_advantage"]),
        ("entropy gap", train, ["entropy_gap"]),
        ("overlap mass", train, ["overlap_mass_student", "overlap_mass_teacher"]),
        ("loss", train, ["loss"]),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(13, 7))
    for axis, (label, rows, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, label=key)
        if label == "student accuracy" and evals and evals[0].get("teacher_accuracy") is not None:
            axis.axhline(
                evals[0]["teacher_accuracy"], color="gray", linestyle="--", label="teacher"
            )
        axis.set_title(label)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(keys) > 1 or label == "student accuracy":
            axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
