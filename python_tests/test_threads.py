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
    for policy in ("auto", "auto-free", 5):  # OPD_FAST_THREADS wins over the config
        assert threads.training_threads(policy) == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("OPD_FAST_THREADS", bad)
        with pytest.raises(ValueError, match="OPD_FAST_THREADS"):
            threads.training_threads()
    monkeypatch.delenv("OPD_FAST_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.training_threads("auto") is None  # the user chose
    assert threads.training_threads("auto-free") is None
    assert threads.training_threads(4) == 4  # a count in the config still pins
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    assert threads.training_threads("auto-free") == 1


def test_auto_does_not_follow_the_load(monkeypatch):
    """The default's count is the same on a quiet machine and a busy one, so the same seed
    gives the same numbers; auto-free follows the load."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OPD_FAST_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    counts = {}
    for busy in (0.0, 1.0, 2.0):
        monkeypatch.setattr(threads, "busy_cores_of_others", lambda window_s=0.25, b=busy: b)
        counts[busy] = (threads.training_threads("auto"), threads.training_threads("auto-free"))
    assert [auto for auto, _ in counts.values()] == [2, 2, 2]
    assert [free for _, free in counts.values()] == [2, 1, 1]


def test_usable_cores_honour_a_cgroup_quota(tmp_path, monkeypatch):
    limits = tmp_path / "cpu.max"
    for text, expected in (("max 100000", None), ("150000 100000", 2), ("50000 100000", 1),
                           ("400000 100000", 4), ("garbage", None)):  # fmt: skip
        limits.write_text(text + "\n")
        assert threads._cgroup_cpu_limit(str(limits)) == expected
    assert threads._cgroup_cpu_limit(str(tmp_path / "absent")) is None
    monkeypatch.setattr(threads, "_cgroup_cpu_limit", lambda: 1)
    assert threads.usable_cores() == 1


@pytest.mark.parametrize("bad", [0, -2, "fast", "Auto"])
def test_a_bad_threads_value_is_named(bad):
    with pytest.raises(ValueError, match="threads must be auto, auto-free or a positive"):
        threads.check_threads(bad)


def test_cpu_threads_sets_and_restores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OPD_FAST_THREADS", "1")
    before = torch.get_num_threads()
    with threads.cpu_threads(torch.device("cpu")) as count:
        assert count == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.delenv("OPD_FAST_THREADS")
    with threads.cpu_threads(torch.device("cpu"), 1) as count:  # the config's count
        assert count == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads.cpu_threads(torch.device("cuda")) as count:  # a GPU run: untouched
        assert count == before and torch.get_num_threads() == before
