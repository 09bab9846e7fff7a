"""dynamics.png: accuracy and the paper's OPD dynamics (overlap ratio, overlap-token advantage,
entropy gap, overlap mass) over training steps."""

from __future__ import annotations

from typing import Any


def per_teacher_names(train: list[dict[str, Any]]) -> list[str]:
    """The teachers a run's train records log metrics for (overlap_ratio/<name>), in order."""
    names: list[str] = []
    for key in train[0] if train else ():
        if key.startswith("overlap_ratio/"):
            names.append(key.split("/", 1)[1])
    return names


def plot_dynamics(records: list[dict[str, Any]], path: str, title: str = "OPD dynamics") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    teachers = per_teacher_names(train)  # several teachers: a line each beside the step's

    def each(key: str) -> list[str]:
        return [key] + [f"{key}/{name}" for name in teachers]

    panels = [
        ("student accuracy", evals, ["student_accuracy"]),
        ("overlap ratio", train, each("overlap_ratio")),
        ("overlap-token advantage", train, each("overlap_token_advantage")),
        ("entropy gap", train, each("entropy_gap")),
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


def plot_position_heatmaps(
    records: list[dict[str, Any]],
    path: str,
    metrics: tuple[str, ...] = (
        "entropy_student",
        "entropy_teacher",
        "overlap_ratio",
        "sampled_token_kl",
    ),
) -> None:
    """Heatmaps of per-token metrics by response-position chunk (x) and training step (y):
    the paper sees high entropy appear at the end of long responses first and spread forward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    train = [r for r in records if r.get("kind") == "train" and r.get("position_profile")]
    if not train:
        raise ValueError("no position_profile in these records (a run from an older version?)")
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4))
    for axis, name in zip(np.atleast_1d(axes), metrics):
        rows = [r["position_profile"].get(name) for r in train]
        width = max(len(row) for row in rows if row)
        grid = np.array(
            [[np.nan if v is None else v for v in (row or [None] * width)] for row in rows],
            dtype=float,
        )
        image = axis.imshow(
            grid,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            extent=(0, width, train[0]["step"] - 0.5, train[-1]["step"] + 0.5),
        )
        axis.set_xlabel("response position chunk (start -> end)")
        axis.set_ylabel("step")
        axis.set_title(name)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
