"""What the benchmarks record about the machine and the build, in every result file."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _output(argv: list[str]) -> str | None:
    """A command's stdout, or None where it is missing or fails."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device | None = None) -> dict:
    """Host, CPU, memory, torch, the load average now, and the GPU of `device` (if CUDA)."""
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as meminfo:
            info["ram_bytes"] = int(meminfo.readline().split()[1]) * 1024
    except OSError:
        pass
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_sm_count=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
        )
        driver = _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if driver:
            info["nvidia_driver"] = driver
    return info


def git_info() -> dict:
    """The commit, and whether the sources that make the op differ from it."""
    commit = _output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    status = _output(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "csrc", "opd_fast", "setup.py"]
    )
    return {"commit": commit or "unknown", "source_dirty": None if status is None else bool(status)}
