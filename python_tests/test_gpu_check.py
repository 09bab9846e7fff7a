"""bench/gpu_check.sh (bench/gpu_check.py) without a GPU: its step list and priorities, that
every CUDA test file is run, its time accounting under simulated step times, the evidence
limits (at most 8 files in $OUT), and the dry run (GPU steps stubbed to sleep their timeouts)
on a 100x faster clock: the 540 s accounting is what is checked, in simulated seconds."""

from __future__ import annotations

import glob
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402  (bench/ is not a package)

PRIORITY = ["machine", "build", "correctness", "numerics", "sanitizer_racecheck",
            "sanitizer_memcheck", "train_smoke", "train_smoke_fsdp2", "bench", "bench_linear",
            "train_payload_fused", "train_packed", "train_async", "train_vllm_fsdp2",
            "sanitizer_synccheck", "rollout_hf"]  # fmt: skip


def fake_context(tmp_path, dry_run=False):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    return gpu_check.Context(out=str(out), work=str(work), python="python3", dry_run=dry_run)


def commands(tmp_path) -> dict:
    context = fake_context(tmp_path)
    return {step.name: step.command(context, 100.0) for step in gpu_check.STEPS}


def test_steps_follow_the_issue_priorities():
    assert [step.name for step in gpu_check.STEPS] == PRIORITY
    for step in gpu_check.STEPS:
        assert 0 < step.min_s <= step.cap_s < gpu_check.TOTAL_BUDGET_S, step.name
    assert gpu_check.TOTAL_BUDGET_S == 540


def test_every_cuda_test_file_is_run(tmp_path):
    argvs = commands(tmp_path)
    cuda_files = sorted(
        os.path.relpath(path, ROOT) for path in glob.glob(str(ROOT / "python_tests/test_cuda*.py"))
    )
    assert cuda_files == sorted(gpu_check.CUDA_TEST_FILES)
    run = [arg for argv in argvs.values() if isinstance(argv, list) for arg in argv]
    for path in cuda_files:
        assert path in run, f"{path} is in no step of gpu_check"
    # Correctness is one pytest call over every kernel and teacher form.
    correctness = argvs["correctness"]
    assert correctness[1:3] == ["-m", "pytest"]
    for path in ("python_tests/test_cuda.py", "python_tests/test_cuda_sparse.py",
                 "python_tests/test_linear.py"):  # fmt: skip
        assert path in correctness
    assert correctness[correctness.index("-m", 3) + 1] == "cuda"
    source = (ROOT / "python_tests/test_linear.py").read_text()
    cuda_test = source[source.index("def test_cuda_matches_materialised") - 300 :]
    assert '["linear", "logits", "payload"]' in cuda_test[:400]
    # the sanitizers run every kernel; the numerics step runs the device-numerics file
    assert "python_tests/test_cuda_numerics.py" in argvs["numerics"]
    assert "--sanitize" in argvs["sanitizer_racecheck"] or isinstance(
        argvs["sanitizer_racecheck"], str
    )
    kernels = (ROOT / "bench/gpu_sanitize.py").read_text()
    for op in ("opd_forward(", "opd_backward(", "row_topk(", "opd_forward_sparse("):
        assert op in kernels


def test_allotment():
    step = gpu_check.Step("x", "x", 100, 20, lambda c, t: [])
    reserve = gpu_check.FINAL_RESERVE_S
    assert gpu_check.allotment(step, 0.0) == (100, "")
    timeout, _ = gpu_check.allotment(step, 540 - reserve - 50)
    assert timeout == pytest.approx(50)
    timeout, reason = gpu_check.allotment(step, 540 - reserve - 19)
    assert timeout is None and reason.startswith("skipped: needs at least 20 s")


class FakeClock:
    scale = 1.0

    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t


@pytest.fixture(autouse=True)
def sanitizer_found(monkeypatch):
    """The accounting tests need every step runnable: a compute-sanitizer is 'found'."""
    monkeypatch.setattr(gpu_check, "_sanitizer", lambda: "/opt/fake/compute-sanitizer")


def simulate(tmp_path, durations: dict, default: float):
    """Runs the step list on a fake clock; each step 'takes' its duration, or its timeout if
    that is shorter (killed). Returns (results, [(start, timeout)], printed lines)."""
    clock, spans, lines = FakeClock(), [], []

    def runner(argv, timeout, log, env, grace):
        spans.append((clock.t, timeout))
        took = durations.get(Path(log).stem, default)
        clock.t += min(took, timeout)
        return (0, False) if took <= timeout else (None, True)

    results = gpu_check.run_steps(gpu_check.STEPS, fake_context(tmp_path), clock, runner,
                                  echo=lambda *a, **k: lines.append(a[0]))  # fmt: skip
    return results, spans, lines, clock.t


@pytest.mark.parametrize("seed", range(6))
def test_accounting_under_simulated_step_times(tmp_path, seed):
    rng = random.Random(seed)
    if seed == 0:  # every step hangs: each is killed at its timeout
        durations, default = {}, 1e9
    elif seed == 1:  # what a healthy run is expected to take
        durations = {"machine": 3, "build": 95, "correctness": 130, "numerics": 30,
                     "sanitizer_racecheck": 45, "sanitizer_memcheck": 25, "train_smoke": 50,
                     "train_smoke_fsdp2": 70}  # fmt: skip
        default = 1e9  # the benchmarks use all they are given
    else:
        durations = {name: rng.uniform(1, 300) for name in PRIORITY}
        default = 1.0
    results, spans, lines, end = simulate(tmp_path, durations, default)
    limit = gpu_check.TOTAL_BUDGET_S - gpu_check.FINAL_RESERVE_S
    assert end <= limit + 1e-9
    for start, timeout in spans:  # no step is allowed to run past the budget
        assert start + timeout <= limit + 1e-9
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == PRIORITY
    for result in results:
        if result.status == "skipped":
            assert result.reason.startswith("skipped: needs at least")
            assert any(result.name in line and "skipped" in line for line in lines)
        else:
            cap = next(s.cap_s for s in gpu_check.STEPS if s.name == result.name)
            assert result.timeout_s <= cap
    if seed == 0:
        assert by_name["build"].status == "timeout" and by_name["bench"].status == "skipped"
    if seed == 1:  # everything up to the benchmarks fits; the op's benchmark gets what is left
        assert all(by_name[n].status == "ok" for n in PRIORITY[:8])
        assert by_name["bench"].status == "timeout" and by_name["bench"].timeout_s >= 60


def test_a_failed_step_does_not_stop_the_next(tmp_path):
    clock = FakeClock()

    def runner(argv, timeout, log, env, grace):
        clock.t += 1
        return (1 if Path(log).stem == "build" else 0), False

    results = gpu_check.run_steps(gpu_check.STEPS, fake_context(tmp_path), clock, runner,
                                  echo=lambda *a, **k: None)  # fmt: skip
    assert results[1].status == "failed" and results[2].status == "ok"


def test_evidence_stays_within_eight_files(tmp_path):
    context = fake_context(tmp_path)
    for index in range(12):  # a step that litters OUT
        Path(context.out, f"stray-{index}.txt").write_text("x")
    Path(context.out, "bench-gpu.json").write_text("{}")
    big = Path(context.work, "bench.log")
    big.write_bytes(b"a" * (gpu_check.LOG_LIMIT_BYTES + 1000))
    files = gpu_check.write_evidence(context, {"steps": []})
    assert len(files) <= gpu_check.MAX_OUT_FILES
    assert set(files) <= set(gpu_check.OUT_FILES)
    assert sorted(os.listdir(context.out)) == files
    with tarfile.open(Path(context.out, "logs.tar.gz")) as archive:
        names = archive.getnames()
        assert "gpu-check-logs/out-stray-3.txt" in names
        assert archive.getmember("gpu-check-logs/bench.log").size <= gpu_check.LOG_LIMIT_BYTES + 100


def test_dry_run_fits_540_s_and_8_files(tmp_path):
    """The script itself, every GPU step stubbed to sleep its timeout, on a clock 100x fast."""
    out = tmp_path / "out"
    begin = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--dry-run",
                           "--time-scale", "0.01"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out)}, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - begin < 60
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and set(files) <= set(gpu_check.OUT_FILES), files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    assert summary["wall_s"] <= 540 and summary["within_budget"]
    statuses = {step["name"]: step["status"] for step in summary["steps"]}
    assert statuses["build"] == "stubbed" and "skipped" in statuses.values()
    # the summary is the last thing printed
    printed = done.stdout[done.stdout.index("===== summary") :].split("\n", 1)[1]
    assert json.loads(printed) == summary


def test_run_process_kills_at_the_timeout(tmp_path):
    log = tmp_path / "sleep.log"
    begin = time.monotonic()
    code, timed_out = gpu_check.run_process(["bash", "-c", "sleep 30 & sleep 30"], 1.0,
                                            str(log), {}, 0.3)  # fmt: skip
    assert timed_out and time.monotonic() - begin < 5
    code, timed_out = gpu_check.run_process(["bash", "-c", "echo hi; exit 3"], 10.0, str(log),
                                            {}, 1.0)  # fmt: skip
    assert (code, timed_out) == (3, False) and "hi" in log.read_text()


def test_headlines_read_the_tools_outputs(tmp_path):
    context = fake_context(tmp_path)
    Path(context.log("sanitizer_racecheck")).write_text(
        "GPU_CHECK_SANITIZER_FILTER --kernel-name kns=opd_fast\n"
        "gpu_sanitize: 28 opd_fast kernel launches done\n"
        "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
    )
    assert gpu_check.sanitizer_headline("racecheck")(context) == {
        "hazards": 2, "errors": 1, "warnings": 1, "launches": 28,
        "kernel_filter": "--kernel-name kns=opd_fast"}  # fmt: skip
    Path(context.log("sanitizer_memcheck")).write_text("========= ERROR SUMMARY: 0 errors\n")
    assert gpu_check.sanitizer_headline("memcheck")(context) == {"errors": 0}
    record = {"case": "c", "dtype": "float32", "loss_error": 1e-7, "loss_bound": 4e-7,
              "loss_bound_cpu": 2e-7, "grad_error": 3e-7, "grad_bound": 8e-7,
              "grad_bound_cpu": 4e-7, "fraction_of_bound": 0.375}  # fmt: skip
    value = json.dumps(record).replace('"', "&quot;")
    Path(context.path("numerics.xml")).write_text(
        f'<testsuites><testsuite><testcase classname="t" name="a"><properties>'
        f'<property name="numerics" value="{value}"/></properties></testcase>'
        f'<testcase classname="t" name="b"><failure message="boom">x</failure></testcase>'
        f"</testsuite></testsuites>"
    )
    numerics = gpu_check.numerics_headline(context)
    assert numerics["tests"] == 2 and numerics["failures"] == 1 and numerics["passed"] == 1
    assert numerics["failed"] == ["t::b: boom"]
    assert numerics["float32"]["worst_fraction_of_device_bound"] == 0.375
    rows = [{"impl": "opd_fast", "mode": "fwd_bwd", "N": 8192, "dtype": "bf16", "status": "ok",
             "median_ms": 3.1, "eff_gbps": 2400.0, "frac_peak": 0.5}]  # fmt: skip
    Path(context.out, "bench-gpu.json").write_text(json.dumps({"rows": rows, "peak_gbps": 4800}))
    bench = gpu_check.bench_headline(context)
    assert bench["best_fraction_of_hbm_peak"] == 0.5
    assert bench["best_fraction_row"] == "fwd_bwd N=8192 bf16"


def test_ci_runs_the_dry_run():
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"gpu_check\.sh --dry-run --time-scale", ci)
