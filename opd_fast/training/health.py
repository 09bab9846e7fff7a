"""A live OPD health check: the paper's failure signature, watched while the run trains.

The paper finds that OPD works when teacher and student share a thinking pattern, and that a
failing run shows it in its dynamics: the top-k overlap ratio stays low and flat (successful
pairs start near 0.72 and climb above 0.9), the overlap-token advantage stays far below 0
instead of rising toward it, and the entropy gap does not narrow. Every `window` steps the
trainer compares the last window of its records with that signature:

- overlap: bad when its mean is under WEAK_OVERLAP, or under COMPATIBLE_OVERLAP without
  rising (slope under OVERLAP_RISE per step), or when it falls by more than OVERLAP_FALL over
  the window (a converged run's overlap wobbles by a point or two: that is not a fall);
- advantage: bad when its mean is under FAR_ADVANTAGE, or under NEAR_ADVANTAGE without rising
  toward 0;
- entropy gap: bad when its mean is over SMALL_ENTROPY_GAP and it is not narrowing (slope >= 0).

The verdict is `failing` when the overlap is bad and at least one of the two others is: a
healthy run's entropy gap often widens for a while as the student re-learns its phrasing, and
its advantage starts a little below 0. A failing verdict is a `health` record in metrics.jsonl
and one warning naming the signals and the paper's remedies; `health_stop` then stops the run
with a checkpoint (resumable). The same thresholds give `opd-fast probe` its verdict.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# The paper's successful pairs start near 0.72 overlap and climb above 0.9; failing ones stay
# low. These cut-offs turn the number into a verdict (the probe's, and the live check's).
COMPATIBLE_OVERLAP = 0.70
WEAK_OVERLAP = 0.50
OVERLAP_RISE = 0.001  # per step: rising, rather than flat
# Over a window: a fall. On the toy world the working pair's overlap, converged near 0.82,
# moves by up to 0.016 over 10 steps (3 seeds); the fall that matters is larger.
OVERLAP_FALL = 0.03
FAR_ADVANTAGE = -0.10  # the overlap-token advantage of a mismatched pair starts near -0.2
NEAR_ADVANTAGE = -0.02
SMALL_ENTROPY_GAP = 0.05

REMEDIES = (
    "the paper's remedies: an off-policy cold start on teacher outputs (cold_start_steps) or "
    "a teacher-aligned prompt template (prompt_template)"
)


def verdict(overlap_ratio: float) -> str:
    """The probe's plain verdict on an initial overlap ratio."""
    if overlap_ratio >= COMPATIBLE_OVERLAP:
        return "compatible thinking patterns: OPD should work"
    if overlap_ratio >= WEAK_OVERLAP:
        return "weak match: consider an off-policy cold start or a teacher-aligned template"
    return "incompatible thinking patterns: cold-start the student on teacher outputs first"


def _slope(values: list[float]) -> float:
    """Least-squares slope per step of evenly spaced values."""
    count = len(values)
    if count < 2:
        return 0.0
    middle = (count - 1) / 2
    numerator = sum((i - middle) * (v - statistics.fmean(values)) for i, v in enumerate(values))
    return numerator / sum((i - middle) ** 2 for i in range(count))


@dataclass(frozen=True)
class Signal:
    name: str
    mean: float
    slope: float
    bad: bool
    reason: str

    def as_record(self) -> dict:
        return {"mean": self.mean, "slope": self.slope, "bad": self.bad, "reason": self.reason}


def _overlap(values: list[float]) -> Signal:
    mean, slope = statistics.fmean(values), _slope(values)
    if mean < WEAK_OVERLAP:
        return Signal("overlap_ratio", mean, slope, True, f"{mean:.2f} < {WEAK_OVERLAP:.2f}")
    if mean < COMPATIBLE_OVERLAP and slope < OVERLAP_RISE:
        return Signal("overlap_ratio", mean, slope, True, f"{mean:.2f} and flat")
    if slope * (len(values) - 1) < -OVERLAP_FALL:
        return Signal("overlap_ratio", mean, slope, True, f"falling ({slope:+.4f}/step)")
    return Signal("overlap_ratio", mean, slope, False, "")


def _advantage(values: list[float]) -> Signal:
    name = "overlap_token_advantage"
    mean, slope = statistics.fmean(values), _slope(values)
    if mean < FAR_ADVANTAGE:
        return Signal(name, mean, slope, True, f"{mean:.3f}, far below 0")
    if mean < NEAR_ADVANTAGE and slope <= 0:
        return Signal(name, mean, slope, True, f"{mean:.3f}, not rising toward 0")
    return Signal(name, mean, slope, False, "")


def _entropy_gap(values: list[float]) -> Signal:
    mean, slope = statistics.fmean(values), _slope(values)
    if mean > SMALL_ENTROPY_GAP and slope >= 0:
        return Signal("entropy_gap", mean, slope, True, f"{mean:.3f}, not narrowing")
    return Signal("entropy_gap", mean, slope, False, "")


def check(train_records: list[dict], step: int, window: int) -> dict | None:
    """The health record of the last `window` train records (None with fewer of them, or
    when a metric is missing)."""
    recent = [r for r in train_records if r["step"] <= step][-window:]
    if len(recent) < window:
        return None
    series = {}
    for name in ("overlap_ratio", "overlap_token_advantage", "entropy_gap"):
        values = [r.get(name) for r in recent]
        if any(v is None or v != v for v in values):  # NaN: a teacher that cannot tell
            return None
        series[name] = values
    overlap = _overlap(series["overlap_ratio"])
    advantage = _advantage(series["overlap_token_advantage"])
    entropy = _entropy_gap(series["entropy_gap"])
    failing = overlap.bad and (advantage.bad or entropy.bad)
    return {
        "kind": "health",
        "step": step,
        "window": window,
        "verdict": "failing" if failing else "healthy",
        "signals": {s.name: s.as_record() for s in (overlap, advantage, entropy)},
    }


def warning(record: dict) -> str:
    """The one-line warning of a failing health record."""
    bad = [
        f"{name.replace('_', ' ')} {signal['reason']}"
        for name, signal in record["signals"].items()
        if signal["bad"]
    ]
    return (
        f"OPD health at step {record['step']}: the paper's failure signature over the last "
        f"{record['window']} steps ({'; '.join(bad)}); {REMEDIES}"
    )
