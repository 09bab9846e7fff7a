"""The thread count of a CPU training run (opd_fast/training/threads.py)."""

from __future__ import annotations

import pytest
import torch

from opd_fast.training import threads


def test_free_cores_leave_the_load_of_other_processes(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.free_cores(busy=0.0) == 2
    assert threads.free_cores(busy=1.0) == 1  # half-busy 2-core machine: one thread
    assert threads.free_cores(busy=6.0) == 1  # never fewer than one
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    assert threads.free_cores(busy=3.4) == 13


def test_busy_cores_of_others_sees_a_spinning_process_not_this_one():
    import subprocess
    import sys

    quiet = threads.busy_cores_of_others(0.5)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = threads.busy_cores_of_others(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.0 <= quiet <= (__import__("os").cpu_count() or 1)
    assert busy >= 0.6  # the spinner holds about one core (more if others run too)


def test_training_threads_follow_the_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OPD_FAST_THREADS", "3")
    assert threads.training_threads() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("OPD_FAST_THREADS", bad)
        with pytest.raises(ValueError, match="OPD_FAST_THREADS"):
            threads.training_threads()
    monkeypatch.delenv("OPD_FAST_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.training_threads() is None  # the user chose
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    assert threads.training_threads() == 1


def test_cpu_threads_sets_and_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OPD_FAST_THREADS", "1")
    before = torch.get_num_threads()
    with threads.cpu_threads(torch.device("cpu")) as count:
        assert count == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads.cpu_threads(torch.device("cuda")) as count:  # a GPU run: untouched
        assert count == before and torch.get_num_threads() == before
