"""How many CPU threads a training run uses.

The count changes the numbers: a different split of a GEMM or a reduction over the threads
rounds differently, and one changed rounding changes the sampled tokens from there on. So the
default, `threads: auto`, takes the count from what this process may use, which a machine
keeps from one run to the next: its CPU affinity, capped by a cgroup CPU quota (and by torch's
own count). The same config and seed then give the same metrics on the same machine, however
busy it is.

`threads: auto-free` follows the load instead, for speed over reproducibility: it starts with
the usable cores minus the cores other processes keep busy (measured over a quarter of a second
from /proc/stat while this process sleeps, so its own work does not count; at least one).
torch's threads wait for each other at every op's barrier, so on a 2-core machine with one core
busy, `opd-fast demo`'s steps took 30x longer with 2 threads than with 1.

`threads: <n>` or OPD_FAST_THREADS=<n> (which wins over the config) pins the count; with
OMP_NUM_THREADS set, `auto` leaves torch's count as the user chose it. A GPU run is untouched.
torch's setting is given back when the run ends.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator

import torch

# The config's `threads` values besides a positive count.
THREAD_POLICIES = ("auto", "auto-free")


def _cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """Whole CPUs a cgroup v2 quota allows this process (rounded up), None without a quota."""
    try:
        with open(path) as limits:
            quota, period = limits.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota; at
    least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, cores if limit is None else min(cores, limit))


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


def check_threads(value, where: str = "config: ") -> None:
    """ValueError unless `value` is auto, auto-free or a positive integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    if value in THREAD_POLICIES:
        return
    raise ValueError(
        f"{where}threads must be auto, auto-free or a positive integer, got {value!r}"
    )


def training_threads(policy: int | str = "auto") -> int | None:
    """The thread count for a CPU training run under `policy` (the config's `threads`), or
    None to leave torch's as it is."""
    check_threads(policy)
    explicit = os.environ.get("OPD_FAST_THREADS", "").strip()
    if explicit:
        count = int(explicit) if explicit.isdigit() else 0
        if count < 1:
            raise ValueError(f"OPD_FAST_THREADS must be a positive integer, got {explicit!r}")
        return count
    if not isinstance(policy, str):
        return policy
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None  # the user chose
    if policy == "auto-free":
        return min(torch.get_num_threads(), free_cores())
    return min(torch.get_num_threads(), usable_cores())


@contextlib.contextmanager
def cpu_threads(device: torch.device, policy: int | str = "auto") -> Iterator[int]:
    """Run a CPU training run with training_threads(policy) threads, restoring torch's after.
    Yields the count in use."""
    before = torch.get_num_threads()
    count = training_threads(policy) if device.type == "cpu" else None
    if count is None or count == before:
        yield before
        return
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)
