"""Step metrics: token-weighted aggregation over micro-batches, metrics.jsonl, summary.json."""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from typing import Any

import torch

from opd_fast.op.names import TOKEN_METRIC_NAMES


class StepMetrics:
    """Averages the per-micro-batch metric means of opd_loss, weighted by their token counts
    (overlap_token_advantage by the tokens where it is defined)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.tokens = 0.0
        self.advantage_tokens = 0.0
        self.empty_overlap_rows = 0.0

    def add(self, metrics: dict[str, Any]) -> None:
        values = {name: float(value) for name, value in metrics.items()}
        tokens = values["num_tokens"]
        empty = values.get("overlap_empty_rows", 0.0)
        self.tokens += tokens
        self.empty_overlap_rows += empty
        self.advantage_tokens += tokens - empty
        for name in TOKEN_METRIC_NAMES:
            if name not in values:
                continue
            weight = tokens - empty if name == "overlap_token_advantage" else tokens
            if weight > 0:
                self.totals[name] = self.totals.get(name, 0.0) + values[name] * weight

    def means(self) -> dict[str, float]:
        result = {}
        for name, total in self.totals.items():
            weight = self.advantage_tokens if name == "overlap_token_advantage" else self.tokens
            result[name] = total / weight if weight > 0 else float("nan")
        result["overlap_empty_rows"] = self.empty_overlap_rows
        result["response_tokens"] = self.tokens
        return result


class PositionProfile:
    """Per-token metrics averaged in `chunks` fixed slices of response positions (slice i holds
    offsets [i * span / chunks, (i + 1) * span / chunks) from the response start), so profiles
    of different steps line up in a heatmap (e.g. entropy spreading from the end backwards)."""

    def __init__(self, span: int, chunks: int = 8):
        self.span, self.chunks = max(span, 1), chunks
        self.sums: dict[str, torch.Tensor] = {}
        # per metric: NaN tokens are left out (overlap_token_advantage on an empty overlap; a
        # metric the teacher cannot provide, e.g. entropy_teacher from an OpenAI engine)
        self.counts: dict[str, torch.Tensor] = {}

    def add(
        self,
        token_metrics: dict[str, torch.Tensor],
        mask: torch.Tensor,
        offsets: torch.Tensor | None = None,
    ) -> None:
        """mask (B, T): the response positions; offsets (B, T): each one's distance from its
        response's start (default: from the row's first response position, one response per
        row)."""
        mask = mask.detach().cpu()
        if offsets is None:
            starts = mask.float().argmax(dim=1, keepdim=True)
            offsets = torch.arange(mask.shape[1]).unsqueeze(0) - starts
        else:
            offsets = offsets.detach().cpu()
        chunk = (offsets.clamp_min(0) * self.chunks // self.span).clamp_max(self.chunks - 1)
        chunk = torch.where(mask, chunk, torch.full_like(chunk, self.chunks))  # drop others
        for name, values in token_metrics.items():
            values = values.detach().cpu().double()
            sums = torch.zeros(self.chunks + 1, dtype=torch.float64)
            counts = torch.zeros(self.chunks + 1, dtype=torch.float64)
            sums.index_add_(0, chunk.flatten(), values.nan_to_num(0.0).flatten())
            counts.index_add_(0, chunk.flatten(), (~torch.isnan(values)).double().flatten())
            self.sums[name] = self.sums.get(name, 0) + sums[: self.chunks]
            self.counts[name] = self.counts.get(name, 0) + counts[: self.chunks]

    def means(self) -> dict[str, list[float | None]]:
        return {
            name: [float(s / c) if c > 0 else None for s, c in zip(sums, self.counts[name])]
            for name, sums in self.sums.items()
        }


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


class MetricsLog:
    """Appends one JSON object per line to <run_dir>/metrics.jsonl."""

    def __init__(self, path: str):
        self.path = path

    def _lines(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, record) of every line. A torn last line (a kill mid-write) is dropped with a
        warning; any other unreadable line is an error naming the file and the line."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as handle:
            lines = handle.readlines()
        parsed = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if number == len(lines) and not line.endswith("\n"):
                    warnings.warn(
                        f"{self.path}: line {number} was cut off mid-write; dropped", stacklevel=3
                    )
                    continue
                raise ValueError(f"{self.path}:{number}: not valid JSON ({error})") from None
            parsed.append((line if line.endswith("\n") else line + "\n", record))
        return parsed

    def truncate(self, records: int | None, step: int, saved: list[str] | None = None) -> None:
        """On resume: keep the first `records` records, those written before the checkpoint
        (None, for a checkpoint that did not count them: those of steps up to `step`), and drop
        a torn last line, so the file reads as if the run had never stopped.

        saved: the checkpoint's copy of those records. A file deleted, cut short, damaged or
        differing from it is restored from it, with a warning; without a copy (a checkpoint
        of format 1), missing records are named in a warning."""
        if saved is not None and records is not None and len(saved) != records:
            saved = None  # a copy that does not match its own count is no help
        try:
            lines = self._lines()
        except ValueError as error:  # a damaged line mid-file
            if saved is None:
                raise
            warnings.warn(f"{error}; restored from the checkpoint of step {step}", stacklevel=2)
            lines = []
        if records is None:
            kept = [line for line, record in lines if record.get("step", 0) <= step]
        else:
            kept = [line for line, _ in lines[:records]]
            if saved is not None and kept != saved:
                warnings.warn(
                    f"{self.path} holds {len(lines)} records; its first {records}, those before "
                    f"checkpoint step {step}, are not the checkpoint's (deleted, cut short or "
                    "changed): restored from the checkpoint's copy",
                    stacklevel=2,
                )
                kept = list(saved)
            elif len(kept) < records:
                warnings.warn(
                    f"{self.path} holds {len(kept)} of the {records} records written before "
                    f"checkpoint step {step} (deleted or cut short); the checkpoint keeps no "
                    f"copy (written by an older opd_fast), so {records - len(kept)} are lost",
                    stacklevel=2,
                )
        if not kept and not os.path.exists(self.path):
            return
        temporary = self.path + ".tmp"
        try:
            with open(temporary, "w") as handle:
                handle.writelines(kept)
            os.replace(temporary, self.path)
        except OSError as error:  # the old file is untouched
            with contextlib.suppress(OSError):
                os.remove(temporary)
            raise OSError(error.errno, f"cannot rewrite {self.path}: {error.strerror}") from None

    def lines(self) -> list[str]:
        """Every record's line as written (what a checkpoint keeps a copy of)."""
        return [line for line, _ in self._lines()]

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({key: _clean(value) for key, value in record.items()}) + "\n"
        try:
            with open(self.path, "a") as handle:
                handle.write(line)
        except OSError as error:  # a full disk: say which file (a torn line is dropped later)
            raise OSError(error.errno, f"cannot append to {self.path}: {error.strerror}") from None

    def read(self) -> list[dict[str, Any]]:
        return [record for _, record in self._lines()]


def gap_recovery(acc_before: float, acc_after: float, acc_teacher: float) -> float | None:
    """(acc_after - acc_before) / (acc_teacher - acc_before); None when there is no gap."""
    gap = acc_teacher - acc_before
    if gap <= 0:
        return None
    return (acc_after - acc_before) / gap


# The dynamics summary.json gives per teacher, when a run has several.
PER_TEACHER_SUMMARY = ("overlap_ratio", "overlap_token_advantage", "entropy_gap", "response_tokens")


def summarise(records: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """summary.json from the metrics.jsonl records of a run."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    before = next((r for r in evals if r["step"] == 0), None)
    after = evals[-1] if evals else None
    acc_before = before["student_accuracy"] if before else None
    acc_after = after["student_accuracy"] if after else None
    teacher_acc = before.get("teacher_accuracy") if before else None
    summary = {
        "steps": train[-1]["step"] if train else 0,
        "student_acc_before": acc_before,
        "student_acc_after": acc_after,
        "teacher_acc": teacher_acc,
        "gap_recovery": (
            gap_recovery(acc_before, acc_after, teacher_acc)
            if None not in (acc_before, acc_after, teacher_acc)
            else None
        ),
        "wall_seconds": wall_seconds,
    }
    for name in (
        "overlap_ratio",
        "overlap_token_advantage",
        "entropy_gap",
        "overlap_mass_student",
        "overlap_mass_teacher",
        "student_topk_mass",
        "loss",
    ):
        summary[f"{name}_first"] = train[0].get(name) if train else None
        summary[f"{name}_last"] = train[-1].get(name) if train else None
    for key in sorted(train[0] if train else ()):  # several teachers: each one's dynamics
        if "/" in key and key.split("/", 1)[0] in PER_TEACHER_SUMMARY:
            summary[f"{key}_first"] = train[0].get(key)
            summary[f"{key}_last"] = train[-1].get(key)
    for key in sorted(before or {}):  # and each one's accuracy
        if key.startswith("teacher_accuracy/"):
            summary[key] = before[key]
    checks = [r for r in records if r.get("kind") == "health"]
    if checks:  # the live health check's last verdict, and the first step it failed at
        summary["health_verdict"] = checks[-1]["verdict"]
        failing = [r["step"] for r in checks if r["verdict"] == "failing"]
        summary["health_first_failing_step"] = failing[0] if failing else None
    return summary


def write_json(path: str, payload: dict[str, Any]) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump({key: _clean(value) for key, value in payload.items()}, handle, indent=2)
    os.replace(temporary, path)
