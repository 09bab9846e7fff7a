"""The one prepared run for a lent GPU machine (bench/gpu_check.sh calls it; see
bench/results/README for reading what it returns).

    bash bench/gpu_check.sh                    # OUT=... for the evidence folder
    bash bench/gpu_check.sh --dry-run          # every GPU step stubbed to sleep its timeout
    bash bench/gpu_check.sh --dry-run --time-scale 0.01   # the same on a 100x faster clock

The whole run, build included, fits TOTAL_BUDGET_S (540 s) of wall time: a command gets 600 s
on the lent machine, and the rest is margin. Steps run in priority order (STEPS); each gets
at most its own cap and never more than the budget the steps before it left (minus
FINAL_RESERVE_S for writing the evidence); a step that cannot get its minimum is skipped with
a line saying so, and a failed step does not stop the next. A step that overruns is sent
SIGTERM, then SIGKILL GRACE_S later, both within its allotment.

Evidence, in $OUT (default bench/results/gpu-local), at most MAX_OUT_FILES files:
  summary.json        every step's status, seconds and headline numbers (the card, the driver,
                      the fraction of HBM bandwidth reached, ...), also printed last on stdout
  logs.tar.gz         every step's log, the junit XML of the test steps, the smoke runs' JSON
  bench-gpu.json      the op's benchmark (bench/bench_opd.py)
  bench-linear-gpu.json  the fused linear benchmark (bench/bench_linear.py), when it ran
Anything else a step leaves in $OUT is moved into the archive.

The clock can be scaled (--time-scale s: a simulated second lasts s real seconds) so that the
dry run checks the 540 s accounting in a few seconds (python_tests/test_gpu_check.py, CI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = 540.0
FINAL_RESERVE_S = 15.0  # writing the archive and the summary after the last step
GRACE_S = 10.0  # SIGTERM this long before a step's allotment ends, then SIGKILL
MAX_OUT_FILES = 8
LOG_LIMIT_BYTES = 4 << 20  # a log beyond this keeps its first and last 2 MiB
OUT_FILES = ("summary.json", "logs.tar.gz", "bench-gpu.json", "bench-linear-gpu.json")
# Every CUDA test file; the correctness and numerics steps must run them all.
CUDA_TEST_FILES = (
    "python_tests/test_cuda.py",
    "python_tests/test_cuda_sparse.py",
    "python_tests/test_cuda_numerics.py",
)
# Peak HBM bandwidth by card (GB/s, the vendor's figure); the fraction reached is against it.
PEAK_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0))


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    out: str  # the evidence folder
    work: str  # logs and intermediate files (archived at the end)
    python: str
    dry_run: bool
    machine: dict = field(default_factory=dict)  # filled by the first step

    def log(self, name: str) -> str:
        return os.path.join(self.work, f"{name}.log")

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)


@dataclass
class Step:
    name: str
    what: str
    cap_s: float  # the most this step may take
    min_s: float  # below this much time it is not started
    command: Callable[[Context, float], list[str] | str | None]
    # (context, the step's timeout) -> argv, or a string: the reason it cannot run here
    headline: Callable[[Context], dict] = lambda context: {}
    env: dict = field(default_factory=dict)


def _cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or "/usr/local/cuda"


def _sanitizer() -> str | None:
    for candidate in (
        os.path.join(_cuda_home(), "bin", "compute-sanitizer"),
        os.path.join(_cuda_home(), "compute-sanitizer", "compute-sanitizer"),
    ):
        if os.path.exists(candidate):
            return candidate
    return shutil.which("compute-sanitizer")


def _pytest(context: Context, files, junit: str, *extra) -> list[str]:
    command = [context.python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    return command + [*files, f"--junitxml={context.path(junit)}", *extra]


def machine_command(context: Context, timeout: float) -> list[str]:
    return [context.python, os.path.abspath(__file__), "--machine-info",
            context.path("machine.json")]


def build_command(context: Context, timeout: float) -> list[str]:
    check = (
        "import json, opd_fast; info = opd_fast.build_info(); "
        "print('BUILD_INFO ' + json.dumps(info)); "
        "assert info.get('with_cuda'), 'extension built without CUDA kernels'"
    )
    pip = f"{context.python} -m pip install --no-build-isolation --no-deps --no-index -e ."
    return ["bash", "-c", f"set -e; {pip}; {context.python} -c \"{check}\""]


def correctness_command(context: Context, timeout: float) -> list[str]:
    files = ["python_tests/test_cuda.py", "python_tests/test_cuda_sparse.py",
             "python_tests/test_linear.py"]  # fmt: skip
    # -m cuda: every test of the two CUDA files, and test_linear.py's CUDA tests (the linear,
    # logits and payload teacher forms of linear_opd_loss on the GPU).
    return _pytest(context, files, "correctness.xml", "-m", "cuda")


def numerics_command(context: Context, timeout: float) -> list[str]:
    return _pytest(context, ["python_tests/test_cuda_numerics.py"], "numerics.xml",
                   "-o", "junit_family=xunit1")  # fmt: skip  (xunit1 keeps record_property)


def sanitizer_command(tool: str):
    def command(context: Context, timeout: float):
        if _sanitizer() is None:
            return "compute-sanitizer not found (CUDA_HOME/bin, CUDA_HOME/compute-sanitizer, PATH)"
        return [context.python, os.path.abspath(__file__), "--sanitize", tool]

    return command


def train_command(fsdp2: bool, name: str = "", *options: str):
    def command(context: Context, timeout: float) -> list[str]:
        result = name or ("train-smoke-fsdp2.json" if fsdp2 else "train-smoke.json")
        script = ["bench/train_smoke.py", "--device", "cuda", *options,
                  "--out", context.path(result)]  # fmt: skip
        if fsdp2:  # the FSDP2 path on one rank (fp32 master weights, bf16 compute, fused loss)
            return [context.python, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "1", *script]  # fmt: skip
        return [context.python, *script]

    return command


def vllm_train_command(context: Context, timeout: float):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed here (pip install vllm); the vllm engine row is skipped"
    return train_command(True, "train-vllm-fsdp2.json", "--engine", "vllm")(context, timeout)


def bench_command(context: Context, timeout: float) -> list[str]:
    peak = context.machine.get("peak_hbm_gbps") or 3350.0
    # bench_opd stops starting baselines once its own budget is used; opd_fast rows always run
    budget = max(10.0, timeout - 45.0) if timeout > 90 else timeout / 2
    return [context.python, "bench/bench_opd.py", "--device", "cuda", "--n", "1024", "8192",
            "--dtypes", "bf16", "fp32", "--vocab", "151936", "--k", "16",
            "--variant", "student_topk", "--estimator", "pg", "--modes", "fwd_bwd", "fwd",
            "--impls", "opd_fast", "floor", "careful", "careful_compile",
            "--settle-s", "0", "--load-retries", "0", "--peak-gbps", f"{peak:g}",
            "--time-budget-s", f"{budget:.0f}",
            "--out", os.path.join(context.out, "bench-gpu.json")]  # fmt: skip


def bench_linear_command(context: Context, timeout: float) -> list[str]:
    return [context.python, "bench/bench_linear.py", "--device", "cuda", "--n", "32768",
            "--hidden", "2048", "--dtypes", "bf16", "--vocab", "151936", "--k", "16",
            "--repeats", "3", "--impls", "fused", "materialised", "chunked_torch",
            "--max-row-s", f"{max(10.0, timeout / 4):.0f}",
            "--out", os.path.join(context.out, "bench-linear-gpu.json")]  # fmt: skip


def rollout_command(context: Context, timeout: float) -> list[str]:
    return [context.python, "bench/bench_rollout.py", "--engine", "hf", "--model",
            "random-qwen3", "--hidden", "1024", "--layers", "8", "--device", "cuda",
            "--dtype", "bfloat16", "--max-new-tokens", "128", "--rounds", "3",
            "--out", context.path("rollout-gpu.json")]  # fmt: skip


# ----- headline numbers (each reads what its step left; a missing file gives {}) -----------


def _read_json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _log_text(context: Context, name: str) -> str:
    try:
        with open(context.log(name), errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def machine_headline(context: Context) -> dict:
    info = _read_json(context.path("machine.json")) or {}
    context.machine.update(info)
    return info


def build_headline(context: Context) -> dict:
    match = re.findall(r"^BUILD_INFO (\{.*\})$", _log_text(context, "build"), re.M)
    return {"build_info": json.loads(match[-1])} if match else {}


def junit_summary(path: str) -> dict:
    """Counts, the failed tests (first 20, with the first line of their message) and the
    records of `numerics` properties from a pytest junit XML file."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, records, skip_reasons = [], [], {}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            element = case.find(kind)
            if element is None:
                continue
            counts[key] += 1
            message = (element.get("message") or "").strip().split("\n")[0][:300]
            if kind == "skipped":
                skip_reasons[message] = skip_reasons.get(message, 0) + 1
            else:
                failed.append(f"{case.get('classname')}::{case.get('name')}: {message}")
        for prop in case.iter("property"):
            if prop.get("name") == "numerics":
                records.append(json.loads(prop.get("value")))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    summary = {**counts, "failed": failed[:20]}
    if skip_reasons:
        summary["skip_reasons"] = dict(sorted(skip_reasons.items(), key=lambda kv: -kv[1])[:5])
    if records:
        summary["records"] = records
    return summary


def correctness_headline(context: Context) -> dict:
    return junit_summary(context.path("correctness.xml"))


def numerics_headline(context: Context) -> dict:
    summary = junit_summary(context.path("numerics.xml"))
    records = summary.pop("records", [])
    for dtype in sorted({r["dtype"] for r in records}):
        rows = [r for r in records if r["dtype"] == dtype]
        worst = max(rows, key=lambda r: r["fraction_of_bound"])
        summary[dtype] = {
            "cases": len(rows),
            "worst_fraction_of_device_bound": worst["fraction_of_bound"],
            "worst_case": worst["case"],
            "worst_loss_error": max(r["loss_error"] for r in rows),
            "worst_grad_error": max((r["grad_error"] or 0.0) for r in rows),
            "over_cpu_bound": sum(
                r["loss_error"] > r["loss_bound_cpu"]
                or (r["grad_error"] or 0.0) > (r["grad_bound_cpu"] or float("inf"))
                for r in rows
            ),
        }
    return summary


def sanitizer_headline(tool: str):
    def headline(context: Context) -> dict:
        text = _log_text(context, f"sanitizer_{tool}")
        out = {}
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        if errors:
            out["errors"] = int(errors[-1])
        hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, "
                             r"(\d+) warnings?\)", text)  # fmt: skip
        if hazards:
            out["hazards"], out["errors"], out["warnings"] = map(int, hazards[-1])
        launches = re.findall(r"gpu_sanitize: (\d+) opd_fast kernel launches", text)
        if launches:
            out["launches"] = int(launches[-1])
        filtered = re.findall(r"^GPU_CHECK_SANITIZER_FILTER (.+)$", text, re.M)
        if filtered:
            out["kernel_filter"] = filtered[-1]
        return out

    return headline


def train_headline(name: str):
    def headline(context: Context) -> dict:
        result = _read_json(context.path(name)) or {}
        keys = ("device_name", "ranks", "fsdp2", "loss_path", "rollout_engine", "max_staleness",
                "teacher", "vocab", "steps", "step_seconds_median",
                "rollout_tokens_per_s_median", "teacher_tokens_per_s_median",
                "train_tokens_per_s_median", "computed_tokens_per_real_token_median",
                "train_peak_memory_mib_max", "peak_memory_mib", "loss_first", "loss_last",
                "wall_seconds")  # fmt: skip
        return {key: result[key] for key in keys if key in result}

    return headline


def bench_headline(context: Context) -> dict:
    document = _read_json(os.path.join(context.out, "bench-gpu.json")) or {}
    rows = document.get("rows", [])
    out = {"rows": len(rows), "ok_rows": sum(r.get("status") == "ok" for r in rows)}
    opd = {}
    for row in rows:
        if row.get("impl") != "opd_fast" or row.get("status") != "ok":
            continue
        key = f"{row['mode']} N={row['N']} {row['dtype']}"
        opd[key] = {name: row.get(name) for name in (
            "median_ms", "eff_gbps", "frac_peak", "x_floor", "speedup_vs_careful",
            "speedup_vs_careful_compile") if row.get(name) is not None}  # fmt: skip
    if opd:
        out["opd_fast"] = opd
        best = max(opd.items(), key=lambda kv: kv[1].get("frac_peak", 0.0))
        out["best_fraction_of_hbm_peak"] = best[1].get("frac_peak")
        out["best_fraction_row"] = best[0]
    out["peak_gbps"] = document.get("peak_gbps")
    return out


def bench_linear_headline(context: Context) -> dict:
    document = _read_json(os.path.join(context.out, "bench-linear-gpu.json")) or {}
    rows = [r for r in document.get("rows", []) if r.get("status") == "ok"]
    keys = ("median_ms", "peak_memory_above_inputs_mib", "time_vs_materialised",
            "memory_vs_materialised")  # fmt: skip
    return {f"{r['impl']} N={r['n']} H={r['hidden']} {r['dtype']}": {
        key: r[key] for key in keys if r.get(key) is not None} for r in rows}  # fmt: skip


def rollout_headline(context: Context) -> dict:
    rows = _read_json(context.path("rollout-gpu.json")) or []
    keys = ("engine", "sequences", "max_new_tokens", "tokens_per_s_median", "startup_s")
    return {key: rows[-1][key] for key in keys if key in rows[-1]} if rows else {}


# The run, in priority order (issue 24): build; correctness of every kernel; device numerics;
# races and memory errors; the trainer; the benchmarks; then synccheck and the rollout engine.
STEPS: tuple[Step, ...] = (
    Step("machine", "the card, driver, toolkit and torch", 30, 5, machine_command,
         machine_headline),  # fmt: skip
    Step("build", "pip install -e . (CPU and CUDA kernels, sm_90)", 240, 60, build_command,
         build_headline, env={"MAX_JOBS": str(os.cpu_count() or 16), "OPD_FAST_CUDA_ARCHS": "90",
                              "TORCH_CUDA_ARCH_LIST": "9.0",
                              "PIP_DISABLE_PIP_VERSION_CHECK": "1"}),  # fmt: skip
    Step("correctness", "every kernel and teacher form: test_cuda.py, test_cuda_sparse.py, "
         "test_linear.py -m cuda", 200, 60, correctness_command, correctness_headline),  # fmt: skip
    Step("numerics", "fp32/bf16 losses and gradients vs fp64 on the GPU (test_cuda_numerics.py)",
         120, 20, numerics_command, numerics_headline),  # fmt: skip
    Step("sanitizer_racecheck", "compute-sanitizer racecheck, every kernel on small shapes", 120,
         25, sanitizer_command("racecheck"), sanitizer_headline("racecheck")),  # fmt: skip
    Step("sanitizer_memcheck", "compute-sanitizer memcheck, every kernel on small shapes", 90, 20,
         sanitizer_command("memcheck"), sanitizer_headline("memcheck"),
         env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),  # fmt: skip
    Step("train_smoke", "8 OPD steps of tiny random Qwen3s in bf16 (bench/train_smoke.py)", 120,
         45, train_command(False), train_headline("train-smoke.json")),  # fmt: skip
    Step("train_smoke_fsdp2", "the same under torchrun: FSDP2 on one rank, fused_linear", 150,
         60, train_command(True), train_headline("train-smoke-fsdp2.json")),  # fmt: skip
    Step("bench", "the op: bf16/fp32, N 1024/8192, V 151,936 vs careful eager, compile, floor",
         240, 60, bench_command, bench_headline),  # fmt: skip
    Step("bench_linear", "fused linear OPD: N 32,768, H 2048, bf16", 120, 45,
         bench_linear_command, bench_linear_headline),  # fmt: skip
    # Beyond issue 24's list, so last, if time is left: the lean path's rows of issue 19 (a
    # payload teacher on the fused path at V = 151,936; packed micro-batches); barrier and
    # warp-mask misuse; the hf rollout engine's tokens/s (a random Qwen3, 256 x 128, bf16).
    Step("train_payload_fused", "a teacher server (payload) on the fused path, V 151,936", 90,
         45, train_command(False, "train-payload-fused.json", "--teacher-server", "--vocab",
                           "151936", "--steps", "3"),
         train_headline("train-payload-fused.json")),  # fmt: skip
    Step("train_packed", "packed micro-batches (pack_sequences, 4,096-token rows)", 75, 40,
         train_command(False, "train-packed.json", "--micro-batch-tokens", "4096", "--pack",
                       "--steps", "3"), train_headline("train-packed.json")),  # fmt: skip
    # Issue 20's rows: rollouts beside training (max_staleness 1; the synchronous loop is
    # train_smoke above, same settings), and the vllm engine under torchrun (skipped with a
    # line where vLLM is not installed, as on the lent machines so far).
    Step("train_async", "max_staleness 1: rollouts sampled beside training (train_smoke)", 120,
         45, train_command(False, "train-async.json", "--max-staleness", "1"),
         train_headline("train-async.json")),  # fmt: skip
    Step("train_vllm_fsdp2", "the vllm engine under torchrun on one rank, weights from FSDP2",
         150, 60, vllm_train_command, train_headline("train-vllm-fsdp2.json")),  # fmt: skip
    Step("sanitizer_synccheck", "compute-sanitizer synccheck (barriers, warp masks)", 60, 20,
         sanitizer_command("synccheck"), sanitizer_headline("synccheck")),  # fmt: skip
    Step("rollout_hf", "rollout tokens/s of the hf engine (bench/bench_rollout.py)", 120, 40,
         rollout_command, rollout_headline),  # fmt: skip
)


# ---------------------------------------------------------------------------------------------
# Time accounting
# ---------------------------------------------------------------------------------------------


class Clock:
    """Simulated seconds since the start: real seconds / scale (scale 1: real time)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.start = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self.start) / self.scale


def allotment(step: Step, elapsed: float, budget: float = TOTAL_BUDGET_S,
              reserve: float = FINAL_RESERVE_S) -> tuple[float | None, str]:  # fmt: skip
    """The timeout a step gets when `elapsed` of `budget` is used: its cap, or what the steps
    before it left (less the reserve for the evidence); None (with the reason) when that is
    below the step's minimum."""
    left = budget - reserve - elapsed
    if left < step.min_s:
        return None, (f"skipped: needs at least {step.min_s:.0f} s, {max(left, 0.0):.0f} s of "
                      f"the {budget:.0f} s budget left")  # fmt: skip
    return min(step.cap_s, left), ""


@dataclass
class StepResult:
    name: str
    what: str
    status: str  # ok, failed, timeout, skipped, stubbed (dry run), not_run (the run was stopped)
    seconds: float = 0.0
    timeout_s: float | None = None
    exit_code: int | None = None
    reason: str = ""
    headline: dict = field(default_factory=dict)
    log: str | None = None


def run_process(argv: list[str], timeout_real: float, log_path: str, env: dict,
                grace_real: float) -> tuple[int | None, bool]:  # fmt: skip
    """Runs argv in its own process group with stdout and stderr in log_path: SIGTERM at
    timeout_real - grace_real, SIGKILL at timeout_real. (exit code, timed out)."""
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env}, start_new_session=True)  # fmt: skip
        try:
            return process.wait(timeout=max(timeout_real - grace_real, 0.0)), False
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=grace_real)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
            return process.returncode, True
        except BaseException:
            _signal_group(process, signal.SIGKILL)
            process.wait()
            raise


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def stub_process(argv, timeout_real, log_path, env, grace_real) -> tuple[int | None, bool]:
    """The dry run's stand-in for a GPU step: sleeps its whole timeout, as a step that
    overruns would (the worst case for the accounting)."""
    with open(log_path, "a") as log:
        log.write(f"dry run: would run {argv}\ndry run: sleeping the timeout\n")
    time.sleep(timeout_real)
    return None, True


def run_steps(steps, context: Context, clock: Clock, runner, budget: float = TOTAL_BUDGET_S,
              echo=print) -> list[StepResult]:  # fmt: skip
    """Runs `steps` in order under the budget; runner(argv, timeout_real, log, env, grace_real)
    -> (exit code, timed out)."""
    results = []
    for step in steps:
        elapsed = clock.now()
        timeout, reason = allotment(step, elapsed, budget)
        result = StepResult(step.name, step.what, "skipped", reason=reason)
        if timeout is not None:
            command = step.command(context, timeout)
            if isinstance(command, str) and context.dry_run:  # stubbed all the same
                command = [f"({command})"]
            elif isinstance(command, str):
                result.reason = f"skipped: {command}"
                timeout = None
        if timeout is None:
            echo(f"=== [{elapsed:5.0f} s] {step.name}: {result.reason}", flush=True)
            results.append(result)
            continue
        grace = min(GRACE_S, timeout / 10)
        echo(f"=== [{elapsed:5.0f} s] {step.name} (timeout {timeout:.0f} s): {step.what}",
             flush=True)  # fmt: skip
        log = context.log(step.name)
        code, timed_out = runner(command, timeout * clock.scale, log, step.env,
                                 grace * clock.scale)  # fmt: skip
        result.seconds = clock.now() - elapsed
        result.timeout_s = timeout
        result.exit_code = code
        result.log = os.path.relpath(log, context.work)
        result.status = "timeout" if timed_out else ("ok" if code == 0 else "failed")
        if context.dry_run:
            result.status = "stubbed"
        elif timed_out:
            result.reason = f"stopped at its timeout of {timeout:.0f} s"
        try:
            result.headline = step.headline(context)
        except Exception as error:  # a headline must never lose the run's evidence
            result.headline = {"headline_error": repr(error)}
        echo(f"=== [{clock.now():5.0f} s] {step.name}: {result.status} "
             f"({result.seconds:.0f} s, exit {code})", flush=True)  # fmt: skip
        _echo_tail(log, echo)
        results.append(result)
    return results


def _echo_tail(path: str, echo, lines: int = 4) -> None:
    try:
        with open(path, errors="replace") as handle:
            tail = handle.read()[-4000:].strip().split("\n")[-lines:]
    except OSError:
        return
    for line in tail:
        echo(f"    | {line[:200]}", flush=True)


# ---------------------------------------------------------------------------------------------
# Evidence
# ---------------------------------------------------------------------------------------------


def _trim_log(path: str) -> None:
    """Keeps a log within LOG_LIMIT_BYTES: its first and last half, with a note between."""
    size = os.path.getsize(path)
    if size <= LOG_LIMIT_BYTES:
        return
    half = LOG_LIMIT_BYTES // 2
    with open(path, "rb") as handle:
        head = handle.read(half)
        handle.seek(size - half)
        tail = handle.read()
    with open(path, "wb") as handle:
        handle.write(head + f"\n[... {size - 2 * half} bytes cut ...]\n".encode() + tail)


def write_evidence(context: Context, summary: dict) -> list[str]:
    """Moves stray files from OUT into the work folder, archives the work folder as
    OUT/logs.tar.gz, writes OUT/summary.json; returns the files left in OUT."""
    for name in sorted(os.listdir(context.out)):
        if name not in OUT_FILES:
            shutil.move(os.path.join(context.out, name), os.path.join(context.work, "out-" + name))
    for name in os.listdir(context.work):
        path = os.path.join(context.work, name)
        if os.path.isfile(path):
            _trim_log(path)
    with tarfile.open(os.path.join(context.out, "logs.tar.gz"), "w:gz") as archive:
        archive.add(context.work, arcname="gpu-check-logs")
    files = sorted(set(os.listdir(context.out)) | {"summary.json"})
    summary["files"] = files
    with open(os.path.join(context.out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    return files


def machine_info(path: str) -> None:
    """The machine step: nvidia-smi, nproc, nvcc, torch and the commit, printed and as JSON."""

    def output(argv):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return done.stdout.strip() if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    info = {"cpus": os.cpu_count(), "cuda_home": _cuda_home()}
    print(output(["nvidia-smi"]) or "nvidia-smi: not available")
    query = output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                    "clocks.max.mem", "--format=csv,noheader,nounits"])  # fmt: skip
    if query:
        first = [part.strip() for part in query.split("\n")[0].split(",")]
        info.update(gpu=first[0], driver=first[1], gpu_memory_mib=_number(first[2]),
                    max_sm_clock_mhz=_number(first[3]), max_mem_clock_mhz=_number(first[4]),
                    gpu_count=len(query.split("\n")))  # fmt: skip
        info["peak_hbm_gbps"] = next((gbps for key, gbps in PEAK_GBPS if key in first[0]), None)
    nvcc = output([os.path.join(_cuda_home(), "bin", "nvcc"), "--version"])
    info["nvcc"] = nvcc.split("\n")[-1] if nvcc else None
    info["compute_sanitizer"] = _sanitizer()
    torch_line = output([sys.executable, "-c", "import torch; print(torch.__version__, "
                         "torch.version.cuda, torch.cuda.is_available())"])  # fmt: skip
    info["torch"] = torch_line
    info["commit"] = output(["git", "-C", ROOT, "rev-parse", "HEAD"])
    print(json.dumps(info, indent=1))
    with open(path, "w") as handle:
        json.dump(info, handle, indent=1)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def sanitize(tool: str) -> int:
    """A sanitizer step: compute-sanitizer --tool TOOL on bench/gpu_sanitize.py, instrumenting
    opd_fast's kernels only; without the name filter when this compute-sanitizer rejects it."""
    sanitizer = _sanitizer()
    base = [sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "100"]
    target = [sys.executable, "bench/gpu_sanitize.py"]
    for kernel_filter in (["--kernel-name", "kns=opd_fast"], []):
        print(f"GPU_CHECK_SANITIZER_FILTER {' '.join(kernel_filter) or 'none'}", flush=True)
        done = subprocess.run(base + kernel_filter + target, cwd=ROOT, capture_output=True,
                              text=True)  # fmt: skip
        sys.stdout.write(done.stdout)
        sys.stdout.write(done.stderr)
        sys.stdout.flush()
        rejected = kernel_filter and "gpu_sanitize:" not in done.stdout and re.search(
            r"(?i)(unrecognized|unknown|invalid).*(option|kernel-name)", done.stdout + done.stderr
        )
        if not rejected:
            return done.returncode
    return 1


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


class Stopped(Exception):
    pass


def _stop(signum, frame):
    raise Stopped(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="stub every GPU step: sleep its timeout, run nothing")  # fmt: skip
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="real seconds per simulated second (CI's dry run: 0.01)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help=argparse.SUPPRESS)
    parser.add_argument("--machine-info", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--sanitize", metavar="TOOL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.machine_info:
        machine_info(args.machine_info)
        return 0
    if args.sanitize:
        return sanitize(args.sanitize)
    if args.time_scale != 1.0 and not args.dry_run:
        parser.error("--time-scale is for dry runs only")

    clock = Clock(args.time_scale)
    out = os.path.abspath(os.environ.get("OUT") or os.path.join(ROOT, "bench/results/gpu-local"))
    os.makedirs(out, exist_ok=True)
    python = os.environ.get("PYTHON") or sys.executable
    context = Context(out=out, work=tempfile.mkdtemp(prefix="opd-gpu-check-"), python=python,
                      dry_run=args.dry_run)  # fmt: skip
    print(f"opd_fast GPU check: budget {args.budget_s:.0f} s, evidence in {out}"
          f"{', DRY RUN (GPU steps stubbed)' if args.dry_run else ''}", flush=True)  # fmt: skip
    signal.signal(signal.SIGTERM, _stop)
    results: list[StepResult] = []
    stopped = None
    try:
        results = run_steps(STEPS, context, clock, stub_process if args.dry_run else run_process,
                            args.budget_s)  # fmt: skip
    except (Stopped, KeyboardInterrupt) as error:
        stopped = f"stopped by {error!r}"
    done = {r.name for r in results}
    results += [StepResult(s.name, s.what, "not_run", reason=stopped or "")
                for s in STEPS if s.name not in done]  # fmt: skip
    steps_ok = all(r.status in ("ok", "skipped", "stubbed") for r in results) and not stopped
    summary = {
        "check": "bench/gpu_check.sh",
        "dry_run": args.dry_run,
        "time_scale": args.time_scale,
        "budget_s": args.budget_s,
        "machine": context.machine,
        "steps_ok": steps_ok,
        "steps": [asdict(r) for r in results],
    }
    if stopped:
        summary["stopped"] = stopped
    files = write_evidence(context, summary)
    shutil.rmtree(context.work, ignore_errors=True)
    # Simulated seconds, the evidence included: what the 540 s limit is about.
    summary["wall_s"] = clock.now()
    summary["within_budget"] = summary["wall_s"] <= args.budget_s
    summary["within_file_limit"] = len(files) <= MAX_OUT_FILES
    # A dry run checks the accounting only; a real run needs every step to pass as well.
    summary["ok"] = summary["within_budget"] and summary["within_file_limit"] and (
        args.dry_run or steps_ok
    )
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(f"===== {len(files)} files in {out}: {' '.join(files)}")
    print("===== summary (also in summary.json) =====")
    print(json.dumps(summary, indent=1), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
