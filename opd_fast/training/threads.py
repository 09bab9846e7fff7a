"""How many CPU threads a training run uses: the cores that other processes leave free.

torch's default is one thread per core. When other processes keep some of those cores busy,
every multi-threaded op waits, at each of its barriers, for the thread that shares a core
with them and runs only part of each time slice: on a 2-core machine with one core busy,
`opd-fast demo`'s steps took 30x longer instead of 2x. So a CPU run starts with as many
threads as there are usable cores minus the load the other processes put on them (at least
one), and gives torch's setting back when it ends.

OPD_FAST_THREADS=<n> sets the count outright; with OMP_NUM_THREADS set, or for a run on a GPU,
nothing is changed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def free_cores(load: float | None = None) -> int:
    """Usable cores minus the 1-minute load average (the other processes' demand), >= 1."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(usable_cores(), round(usable_cores() - load)))


def training_threads() -> int | None:
    """The thread count for a CPU training run, or None to leave torch's as it is."""
    explicit = os.environ.get("OPD_FAST_THREADS", "").strip()
    if explicit:
        count = int(explicit) if explicit.isdigit() else 0
        if count < 1:
            raise ValueError(f"OPD_FAST_THREADS must be a positive integer, got {explicit!r}")
        return count
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None  # the user chose
    return min(torch.get_num_threads(), free_cores())


@contextlib.contextmanager
def cpu_threads(device: torch.device) -> Iterator[int]:
    """Run a CPU training run with training_threads() threads, restoring torch's after.
    Yields the count in use."""
    before = torch.get_num_threads()
    count = training_threads() if device.type == "cpu" else None
    if count is None or count == before:
        yield before
        return
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)
