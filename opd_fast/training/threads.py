"""How many CPU threads a training run uses: the cores that other processes leave free.

torch's default is one thread per core. When other processes keep some of those cores busy,
every multi-threaded op waits, at each of its barriers, for the thread that shares a core
with them and runs only part of each time slice: on a 2-core machine with one core busy,
`opd-fast demo`'s steps took 30x longer instead of 2x. So a CPU run starts with as many
threads as there are usable cores minus the cores other processes keep busy (measured over a
quarter of a second from /proc/stat while this process sleeps, so its own work does not count;
at least one), and gives torch's setting back when it ends. The load average is no measure:
it counts this process's own earlier work (building the toy world, loading models).

OPD_FAST_THREADS=<n> sets the count outright; with OMP_NUM_THREADS set, or for a run on a GPU,
nothing is changed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def busy_cores_of_others(window_s: float = 0.25) -> float:
    """Cores other processes keep busy, from /proc/stat over `window_s` while this process
    sleeps; 0.0 where /proc/stat cannot be read."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total_before, idle_before = sample()
        time.sleep(window_s)
        total_after, idle_after = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    elapsed = total_after - total_before
    if elapsed <= 0:
        return 0.0
    busy_fraction = 1.0 - (idle_after - idle_before) / elapsed
    return max(0.0, busy_fraction) * (os.cpu_count() or 1)


def free_cores(busy: float | None = None) -> int:
    """Usable cores minus the cores other processes keep busy (`busy`, measured when None),
    at least 1."""
    if busy is None:
        busy = busy_cores_of_others()
    return max(1, min(usable_cores(), round(usable_cores() - busy)))


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
