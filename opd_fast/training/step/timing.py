"""The step's one timing helper: wall seconds per named stage, summed over repeats."""

from __future__ import annotations

import contextlib
import time


class StageTimer:
    """`with timer.stage("score"): ...` adds the block's wall time to seconds["score"];
    `add` books time measured inside a stage (the teacher's, within scoring)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
