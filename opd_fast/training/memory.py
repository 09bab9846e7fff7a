"""Peak memory of a stretch of training (a step, its rollouts, its update), as metrics.jsonl
records it: on CUDA the allocator's peak, on CPU the process's peak resident set (RSS).

On Linux the RSS high-water mark can be reset (/proc/self/clear_refs, "5"), so each stretch
gets its own peak; where it cannot, the reading is the process's peak so far. Before the reset
the C allocator returns its free memory to the system (glibc's malloc_trim), so that what a
stretch starts from is what is live, not what an earlier stretch freed.
"""

from __future__ import annotations

import ctypes
import resource

import torch

_CLEAR_REFS, _STATUS = "/proc/self/clear_refs", "/proc/self/status"


def _return_free_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_rss_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return 0.0


def _rss_peak_mib() -> float:
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class PeakMemory:
    """start() then peak_mib(): the peak since start; overall_mib: the largest peak_mib() so
    far (what resetting the counters would otherwise lose)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.overall_mib = 0.0
        self.started_mib = 0.0

    def start(self) -> None:
        """Begin a stretch; `started_mib` is what was resident (allocated on CUDA) then."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.started_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            _return_free_memory()
            _reset_rss_peak()
            self.started_mib = _rss_mib()

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _rss_peak_mib()
        self.overall_mib = max(self.overall_mib, peak)
        return peak
