"""Benchmark of the fused OPD op (opd_fast.opd_loss) against the PyTorch reference.

Implementations (--impls):
  opd_fast       opd_fast.opd_loss (the fused op; default check_values=True, one host sync)
  eager          opd_fast.op.reference.opd_loss as written: dense (N, V) masks, a tie-exact top-k
                 built from torch.topk + a cumsum over V, every quantity a full-vocabulary tensor
  compile        torch.compile(opd_fast.op.reference.opd_loss, dynamic=False), compiled once per
                 (N, dtype); the first call (compilation) is reported as compile_s, not timed
  eager_careful  NOT the reference: a hand-written eager PyTorch version of student_topk/pg
                 (log_softmax + torch.topk + gather, same loss, gradient and metrics) that a
                 careful user would write; torch.topk's tie order is unspecified, so on tied
                 logits its set may differ from the reference's lowest-id rule

Modes: fwd (under torch.no_grad) and fwd_bwd (forward, then torch.autograd.grad of the loss
w.r.t. the student logits; no .grad accumulation).

Per row (impl, mode, N, dtype): median / p10 / p90 of the wall time over `repeats` calls after
warm-up (CUDA: events around each call), effective bandwidth = minimum bytes / median time with
fwd: 2*N*V*bytes (read S and T once) and fwd_bwd: 3*N*V*bytes (also write dS once), its
fraction of --peak-gbps, the peak memory above the inputs, and for opd_fast rows its speed-up
over every baseline measured in the same run.

Peak memory above the inputs:
  cpu   each (impl, N, dtype) runs in a fresh subprocess; after a warm-up call on a tiny batch
        (N=2, same V), the inputs are made, the process's RSS high-water mark is reset
        (`echo 5 > /proc/self/clear_refs`), one call runs, and VmHWM - VmRSS(before) is the
        peak.  Compile rows are measured after the compiling call instead.  Allocations under
        glibc's mmap threshold (<= 32 MB) may reuse memory malloc kept from earlier calls, so
        the number can be low by a few tens of MB, never for (N, V)-sized buffers.
  cuda  torch.cuda.max_memory_allocated() - memory_allocated() before the call, after
        torch.cuda.reset_peak_memory_stats() (the caching allocator's view).

Also per row: the median process CPU time per call (all threads) and, from getrusage, user and
system time, minor page faults and involuntary context switches per call, and the 1-min load
average: on a shared machine they tell contention and page-fault cost apart from kernel time.

Baselines are skipped (row status "skipped", with the reason) when their peak memory predicted
from a smaller N of the same run (linear in N) would not fit, when one call is predicted to take
longer than --max-call-s, or when --time-budget-s is spent. opd_fast rows always run.

Example:
  python bench/bench_opd.py --device cpu --n 256 1024 --dtypes fp32 bf16
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import git_info, machine_info  # bench/machine.py

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("opd_fast", "eager", "eager_careful", "compile")
BASELINES = ("eager", "eager_careful", "compile")
MODES = ("fwd", "fwd_bwd")
DEFAULT_PEAK_GBPS = {"cpu": 28.0, "cuda": 3350.0}
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Bytes of peak memory above the inputs per logits element, assumed before any measurement
# of this run exists (so the first N of a config is only skipped when clearly hopeless).
PRIOR_BYTES_PER_ELEMENT = {"opd_fast": 4.0, "eager": 40.0, "eager_careful": 20.0, "compile": 20.0}


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def careful_eager_opd_loss(student_logits, teacher_logits, *, k=16, temperature=1.0):
    """Hand-written eager student_topk / pg loss and metrics (token_mean over all rows).

    student_logits, teacher_logits: (N, V). Returns (loss scalar, dict of (N,) metrics).
    Same value and gradient as the reference for student_topk/pg, but the set is torch.topk's
    (ties in unspecified order) and only (N, k) tensors are built beyond the log-softmaxes.
    """
    compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student = student_logits.to(compute_dtype)
    teacher = teacher_logits.to(compute_dtype)
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    log_p = torch.log_softmax(student, dim=-1)
    with torch.no_grad():
        log_q = torch.log_softmax(teacher, dim=-1)
        student_ids = torch.topk(student_logits.detach(), k, dim=-1).indices
        teacher_ids = torch.topk(teacher_logits, k, dim=-1).indices
    log_p_set = log_p.gather(1, student_ids)  # (N, k), carries the gradient
    log_q_set = log_q.gather(1, student_ids)
    p_set = log_p_set.detach().exp()
    weight = p_set / p_set.sum(dim=-1, keepdim=True)
    advantage = weight * (log_q_set - log_p_set.detach())
    value = -advantage.sum(dim=-1)
    surrogate = -(advantage * log_p_set).sum(dim=-1)
    loss_rows = value + (surrogate - surrogate.detach())
    with torch.no_grad():
        q_set = log_q_set.exp()
        in_teacher = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(dim=-1)
        overlap_count = in_teacher.sum(dim=-1)
        mass_p = (p_set * in_teacher).sum(dim=-1)
        mass_q = (q_set * in_teacher).sum(dim=-1)
        log_p_til = log_p_set.detach() - mass_p.log().unsqueeze(-1)
        log_q_til = log_q_set - mass_q.log().unsqueeze(-1)
        p_til = torch.where(in_teacher, log_p_til.exp(), 0.0)
        overlap_sum = torch.where(in_teacher, p_til * (log_q_til - log_p_til), 0.0).sum(dim=-1)
        entropy_student = -torch.special.xlogy(log_p.detach().exp(), log_p.detach().exp()).sum(-1)
        entropy_teacher = -torch.special.xlogy(log_q.exp(), log_q.exp()).sum(dim=-1)
        metrics = {
            "overlap_ratio": overlap_count.to(compute_dtype) / k,
            "overlap_mass_student": mass_p,
            "overlap_mass_teacher": mass_q,
            "overlap_token_advantage": torch.where(
                overlap_count > 0, overlap_sum / overlap_count.clamp_min(1), float("nan")
            ),
            "entropy_student": entropy_student,
            "entropy_teacher": entropy_teacher,
            "entropy_gap": (entropy_teacher - entropy_student).abs(),
            "student_topk_mass": p_set.sum(dim=-1),
            "teacher_topk_mass": log_q.gather(1, teacher_ids).exp().sum(dim=-1),
        }
    return loss_rows.mean(), metrics


def make_loss_fn(impl, args):
    """A function (student, teacher) -> scalar loss tensor for `impl`."""
    import opd_fast
    from opd_fast.op import reference

    options = dict(
        k=args.k, variant=args.variant, estimator=args.estimator, temperature=args.temperature
    )
    if impl == "opd_fast":
        return lambda s, t: opd_fast.opd_loss(s, t, **options).loss
    if impl == "eager":
        return lambda s, t: reference.opd_loss(s, t, **options)[0]
    if impl == "compile":
        torch._dynamo.reset()  # a fresh compilation per config, clear of the recompile limit
        if getattr(args, "cold_compile", False):
            from torch._inductor import config as inductor_config

            inductor_config.force_disable_caches = True
        compiled = torch.compile(reference.opd_loss, dynamic=False)
        return lambda s, t: compiled(s, t, **options)[0]
    if impl == "eager_careful":
        return lambda s, t: careful_eager_opd_loss(s, t, k=args.k, temperature=args.temperature)[0]
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def make_inputs(rows, vocab, dtype, device, seed):
    """Student logits ~ 2*N(0,1) and a correlated teacher (student + N(0,1)), made in chunks
    so no fp32 (N, V) temporary is needed."""
    generator = torch.Generator(device=device).manual_seed(seed)
    student = torch.empty(rows, vocab, dtype=dtype, device=device)
    teacher = torch.empty(rows, vocab, dtype=dtype, device=device)
    chunk = max(1, (1 << 24) // vocab)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        shape = (stop - start, vocab)
        s = 2.0 * torch.randn(shape, generator=generator, device=device)
        t = s + torch.randn(shape, generator=generator, device=device)
        student[start:stop].copy_(s)
        teacher[start:stop].copy_(t)
    return student, teacher


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _proc_status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap():
    """Give memory that malloc keeps from freed blocks back to the OS (glibc malloc_trim), so
    that reusing it during the measured call shows up in the RSS high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_once(fn, student, teacher, mode):
    """Run one call; returns what must stay alive until the call is timed."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(student, teacher)
    loss = fn(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    return loss, grad


def timed_call(fn, student, teacher, mode, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = call_once(fn, student, teacher, mode)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, result
    begin = time.perf_counter()
    result = call_once(fn, student, teacher, mode)
    return time.perf_counter() - begin, result


def measured_peak_call(fn, student, teacher, mode, device):
    """(seconds, peak bytes above what was allocated before, result) of one call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        seconds, result = timed_call(fn, student, teacher, mode, device)
        return seconds, torch.cuda.max_memory_allocated(device) - before, result
    _release_free_heap()
    before_kb = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    seconds, result = timed_call(fn, student, teacher, mode, device)
    return seconds, (_proc_status_kb("VmHWM") - before_kb) * 1024, result


def loss_value(result, mode):
    loss = result if mode == "fwd" else result[0]
    return float(loss.detach().float())


def run_impl(spec):
    """Measure one (impl, N, dtype) for each requested mode. Returns a list of row dicts."""
    args = argparse.Namespace(**spec["args"])
    impl, rows, dtype_name = spec["impl"], spec["rows"], spec["dtype"]
    device, dtype = torch.device(args.device), DTYPES[dtype_name]
    fn = make_loss_fn(impl, args)
    fingerprint = extension_fingerprint().get("extension_sha256") if impl == "opd_fast" else None
    if impl != "compile":  # one-time initialisation (threads, lazy modules) off the books
        tiny_s, tiny_t = make_inputs(2, args.vocab, dtype, device, args.seed)
        tiny_s.requires_grad_(True)
        for mode in spec["modes"]:
            del_result = call_once(fn, tiny_s, tiny_t, mode)
            del del_result
        del tiny_s, tiny_t
        _sync(device)
    student, teacher = make_inputs(rows, args.vocab, dtype, device, args.seed)
    student.requires_grad_(True)
    _sync(device)
    out = []
    for mode in spec["modes"]:
        row = {
            "impl": impl,
            "mode": mode,
            "N": rows,
            "dtype": dtype_name,
            "status": "ok",
            "loadavg_1m_before": os.getloadavg()[0],
        }
        if fingerprint:
            row["extension_sha256"] = fingerprint
        repeats = spec["repeats"]
        try:
            if impl == "compile":
                first_s, result = timed_call(fn, student, teacher, mode, device)  # compiles
                del result
                row["first_call_s"] = first_s
                call_s, peak, result = measured_peak_call(fn, student, teacher, mode, device)
                untimed = 2
            else:
                call_s, peak, result = measured_peak_call(fn, student, teacher, mode, device)
                row["first_call_s"] = call_s
                untimed = 1
            # eager: one untimed call fewer (it takes tens of seconds on a CPU)
            warmup = max(0, args.warmup - untimed) if spec["slow"] else args.warmup
            row["loss"] = loss_value(result, mode)
            del result
            row["peak_mem_bytes"] = int(peak)
            if call_s * repeats > args.max_row_s:  # keep slow rows inside their time allowance
                repeats = max(2, int(args.max_row_s // max(call_s, 1e-9)))
                row["note"] = f"repeats cut to {repeats} to stay within --max-row-s"
            for _ in range(warmup):
                del_result = call_once(fn, student, teacher, mode)
                del del_result
            _sync(device)
            times, cpu_times = [], []
            usage_before = resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(repeats):
                cpu_begin = time.process_time()
                seconds, result = timed_call(fn, student, teacher, mode, device)
                cpu_times.append(time.process_time() - cpu_begin)
                del result
                times.append(seconds)
            usage_after = resource.getrusage(resource.RUSAGE_SELF)
            times_ms = np.array(times) * 1e3
            # CPU time of the whole process (all threads) per call: a cross-check that is less
            # sensitive to other processes competing for the cores than wall time
            row["cpu_time_median_ms"] = float(np.median(cpu_times) * 1e3)
            row["involuntary_switches_per_call"] = (
                usage_after.ru_nivcsw - usage_before.ru_nivcsw
            ) / repeats
            row["minor_faults_per_call"] = (
                usage_after.ru_minflt - usage_before.ru_minflt
            ) / repeats
            row["user_ms_per_call"] = (usage_after.ru_utime - usage_before.ru_utime) / repeats * 1e3
            row["sys_ms_per_call"] = (usage_after.ru_stime - usage_before.ru_stime) / repeats * 1e3
            row.update(
                repeats=repeats,
                untimed_calls=untimed + warmup,
                median_ms=float(np.median(times_ms)),
                p10_ms=float(np.percentile(times_ms, 10)),
                p90_ms=float(np.percentile(times_ms, 90)),
                min_ms=float(times_ms.min()),
                max_ms=float(times_ms.max()),
                times_ms=[round(t, 4) for t in times_ms.tolist()],
            )
            if impl == "compile":
                row["compile_s"] = max(0.0, row["first_call_s"] - row["median_ms"] / 1e3)
        except OUT_OF_MEMORY as error:
            row.update(status="skipped", reason=f"out of memory: {str(error).splitlines()[0]}")
        except Exception as error:  # keep the other rows
            row.update(status="error", reason=f"{type(error).__name__}: {error}"[:500])
        out.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def error_rows(spec, reason: str) -> list[dict]:
    """One "error" result row per mode of `spec`, for a configuration that could not run."""
    return [
        {
            "impl": spec["impl"],
            "mode": mode,
            "N": spec["rows"],
            "dtype": spec["dtype"],
            "status": "error",
            "reason": reason,
        }
        for mode in spec["modes"]
    ]


def run_isolated(spec, timeout_s):
    """run_impl in a fresh Python process (clean RSS for the memory measurement)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"worker timed out after {timeout_s:.0f} s"
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("@@ROWS@@"):
            return json.loads(line[len("@@ROWS@@") :]), None
    why = f"worker exited with code {completed.returncode}"
    if completed.returncode in (-9, 137):
        why += " (killed: likely out of memory)"
    tail = (completed.stderr or "").strip().splitlines()[-3:]
    return None, why + (": " + " | ".join(tail) if tail else "")


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def available_memory_bytes(device):
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def extension_fingerprint():
    """sha256 and mtime of the loaded opd_fast._C, to tell builds apart."""
    import hashlib

    import opd_fast

    path = opd_fast.build_info().get("extension")
    if not path or not os.path.exists(path):
        return {}
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(timespec="seconds")
    return {"extension_sha256": digest[:16], "extension_mtime": mtime}


def nearest_smaller(measured, impl, mode, dtype, rows):
    """The measured row of the largest N below `rows` for (impl, mode, dtype), or None."""
    best = None
    for row in measured:
        if (
            (row["impl"], row["mode"], row["dtype"]) == (impl, mode, dtype)
            and row["status"] == "ok"
            and row["N"] < rows
        ):
            if best is None or row["N"] > best["N"]:
                best = row
    return best


def skip_reason(impl, rows, dtype, args, measured, elapsed_s, device, repeats):
    """Why a baseline should not run at (rows, dtype), or None. Peak memory and time per call
    are predicted linear in N from the largest smaller N measured in this run."""
    if impl == "opd_fast":
        return None
    if impl == "eager_careful" and (args.variant, args.estimator) != ("student_topk", "pg"):
        return "eager_careful implements variant student_topk with estimator pg only"
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    inputs = 2 * rows * args.vocab * element
    smaller = [nearest_smaller(measured, impl, m, dtype, rows) for m in args.modes]
    if any(row is None for row in smaller):
        peak, basis = PRIOR_BYTES_PER_ELEMENT[impl] * rows * args.vocab, "prior guess"
        call_s = None
    else:
        peak = max(row["peak_mem_bytes"] * rows / row["N"] for row in smaller)
        basis = f"scaled from N={smaller[0]['N']} of this run"
        call_s = [row["median_ms"] / 1e3 * rows / row["N"] for row in smaller]
    have = available_memory_bytes(device) * args.mem_fraction
    if inputs + peak > have:
        return (
            f"would not fit in memory: needs ~{(inputs + peak) / 2**30:.1f} GiB (inputs "
            f"{inputs / 2**30:.1f} GiB + peak {peak / 2**30:.1f} GiB, {basis}), "
            f"{have / 2**30:.1f} GiB usable"
        )
    if call_s is not None and max(call_s) > args.max_call_s:
        return (
            f"too slow: one call predicted ~{max(call_s):.0f} s (> --max-call-s "
            f"{args.max_call_s:.0f})"
        )
    if args.time_budget_s is not None:
        remaining = args.time_budget_s - elapsed_s
        cost = 0.0
        if call_s is not None:
            cost = sum(min(t * (repeats + 3), args.max_row_s + 2 * t) for t in call_s)
            if impl == "compile":  # compilation time does not grow with N
                cost += sum(row["compile_s"] for row in smaller)
        if remaining <= 0 or cost > remaining:
            return (
                f"time budget: ~{cost:.0f} s predicted, {max(remaining, 0):.0f} s of "
                f"--time-budget-s left"
            )
    return None


def add_derived(rows_out, args, peak_gbps):
    for row in rows_out:
        element = torch.empty((), dtype=DTYPES[row["dtype"]]).element_size()
        passes = 2 if row["mode"] == "fwd" else 3
        row.update(
            V=args.vocab,
            k=args.k,
            variant=args.variant,
            estimator=args.estimator,
            temperature=args.temperature,
            device=args.device,
        )
        row["bytes_min"] = passes * row["N"] * args.vocab * element
        row["grad_bytes"] = row["N"] * args.vocab * element
        if row["status"] != "ok":
            continue
        gbps = row["bytes_min"] / (row["median_ms"] / 1e3) / 1e9
        row["eff_gbps"] = gbps
        row["frac_peak"] = gbps / peak_gbps
        if row["mode"] == "fwd_bwd":
            row["peak_mem_over_grad"] = row["peak_mem_bytes"] / row["grad_bytes"]
    by_key = {(r["impl"], r["mode"], r["N"], r["dtype"]): r for r in rows_out}
    for row in rows_out:
        if row["impl"] != "opd_fast" or row["status"] != "ok":
            continue
        for base in BASELINES:
            other = by_key.get((base, row["mode"], row["N"], row["dtype"]))
            if other is not None and other["status"] == "ok":
                row[f"speedup_vs_{base}"] = other["median_ms"] / row["median_ms"]
                row[f"loss_diff_vs_{base}"] = abs(other["loss"] - row["loss"])
                if "cpu_time_median_ms" in other and "cpu_time_median_ms" in row:
                    row[f"cpu_time_speedup_vs_{base}"] = (
                        other["cpu_time_median_ms"] / row["cpu_time_median_ms"]
                    )


def check_targets(rows_out):
    """The issue's CPU targets, evaluated on every opd_fast fwd_bwd row."""
    targets = []
    for row in rows_out:
        if row["impl"] != "opd_fast" or row["mode"] != "fwd_bwd" or row["status"] != "ok":
            continue
        result = {
            "N": row["N"],
            "dtype": row["dtype"],
            "speedup_vs_eager": row.get("speedup_vs_eager"),
            "speedup_vs_compile": row.get("speedup_vs_compile"),
            "peak_mem_over_grad": row.get("peak_mem_over_grad"),
        }
        if result["speedup_vs_eager"] is not None:
            result["meets_5x_eager"] = result["speedup_vs_eager"] >= 5
        if result["speedup_vs_compile"] is not None:
            result["meets_2x_compile"] = result["speedup_vs_compile"] >= 2
        result["meets_memory"] = result["peak_mem_over_grad"] <= 1.05
        for base in ("eager", "compile"):
            if f"cpu_time_speedup_vs_{base}" in row:
                result[f"cpu_time_speedup_vs_{base}"] = row[f"cpu_time_speedup_vs_{base}"]
        targets.append(result)
    return targets


def format_table(rows_out, peak_gbps):
    header = (
        f"{'impl':<14}{'mode':<8}{'N':>6} {'dtype':<5}{'median ms':>11}{'p10':>10}"
        f"{'p90':>10}{'reps':>5}{'GB/s':>8}{'%peak':>7}{'peak MiB':>10}{'xgrad':>6}"
        f"{'vs eager':>9}{'vs comp':>8}{'vs care':>8}{'cpu-time ms':>12}{'load':>6}  note"
    )
    lines = [
        f"(effective bandwidth = minimum bytes / median; peak = {peak_gbps:g} GB/s; cpu-time = "
        "median process CPU time per call, all threads; load = 1-min load average before)",
        header,
        "-" * len(header),
    ]
    for row in rows_out:
        head = f"{row['impl']:<14}{row['mode']:<8}{row['N']:>6} {row['dtype']:<5}"
        if row["status"] != "ok":
            lines.append(head + f"  {row['status']}: {row.get('reason', '')}")
            continue

        def ratio(key, row=row):
            return f"{row[key]:.1f}x" if key in row else "-"

        xgrad = f"{row['peak_mem_over_grad']:.2f}" if "peak_mem_over_grad" in row else "-"
        cpu_ms = f"{row['cpu_time_median_ms']:.1f}" if "cpu_time_median_ms" in row else "-"
        load = f"{row['loadavg_1m_before']:.1f}" if "loadavg_1m_before" in row else "-"
        note = row.get("note", "")
        if row["impl"] == "compile":
            note = f"compile {row['compile_s']:.1f} s " + note
        lines.append(
            head + f"{row['median_ms']:>11.2f}{row['p10_ms']:>10.2f}{row['p90_ms']:>10.2f}"
            f"{row['repeats']:>5}{row['eff_gbps']:>8.2f}{100 * row['frac_peak']:>6.1f}%"
            f"{row['peak_mem_bytes'] / 2**20:>10.0f}{xgrad:>6}{ratio('speedup_vs_eager'):>9}"
            f"{ratio('speedup_vs_compile'):>8}{ratio('speedup_vs_eager_careful'):>8}"
            f"{cpu_ms:>12}{load:>6}  {note}"
        )
    return "\n".join(lines)


def markdown_table(document):
    """The rows of a results file as a markdown table (for bench/README.md)."""
    lines = [
        f"| impl | mode | N | dtype | median ms | p10 - p90 ms | reps | GB/s | % of "
        f"{document['peak_gbps']:g} GB/s | peak MiB above inputs (x grad) | opd_fast speed-up "
        "vs eager / compile / eager_careful | load |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    skipped = {}
    for row in document["rows"]:
        key = (row["impl"], row["N"], row["dtype"])
        if row["status"] != "ok":
            if skipped.get(key) != row.get("reason"):  # one line for both modes
                skipped[key] = row.get("reason")
                lines.append(
                    f"| {row['impl']} | all | {row['N']} | {row['dtype']} | "
                    f"{row['status']}: {row.get('reason', '')} ||||||||"
                )
            continue
        ratio = f" ({row['peak_mem_over_grad']:.3f})" if "peak_mem_over_grad" in row else ""
        speedups = ""
        if row["impl"] == "opd_fast":
            speedups = " / ".join(
                f"{row[f'speedup_vs_{base}']:.1f}x" if f"speedup_vs_{base}" in row else "-"
                for base in ("eager", "compile", "eager_careful")
            )
        lines.append(
            f"| {row['impl']} | {row['mode']} | {row['N']} | {row['dtype']} | "
            f"{row['median_ms']:.1f} | {row['p10_ms']:.1f} - {row['p90_ms']:.1f} | "
            f"{row['repeats']} | {row['eff_gbps']:.2f} | {100 * row['frac_peak']:.1f}% | "
            f"{row['peak_mem_bytes'] / 2**20:.0f}{ratio} | {speedups} | "
            f"{row.get('loadavg_1m_before', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--n", type=int, nargs="+", default=[256, 1024, 4096], help="numbers of rows (tokens) N"
    )
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--variant", default="student_topk")
    parser.add_argument("--estimator", default="pg")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls of opd_fast (default 20 cpu, 100 cuda)",
    )
    parser.add_argument(
        "--baseline-repeats",
        type=int,
        default=None,
        help="timed calls of compile / eager_careful (default 5 cpu, 20 cuda)",
    )
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=None,
        help="timed calls of the eager reference (default 3 cpu, 10 cuda)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls before timing (the eager reference does one less)",
    )
    parser.add_argument(
        "--max-row-s",
        type=float,
        default=240.0,
        help="cut repeats (to no fewer than 2) so one row takes about this long",
    )
    parser.add_argument(
        "--max-call-s",
        type=float,
        default=120.0,
        help="skip a baseline whose single call is predicted to take longer",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="skip baselines once the run has used this long (opd_fast still runs)",
    )
    parser.add_argument(
        "--mem-fraction",
        type=float,
        default=0.85,
        help="fraction of available memory a config may be predicted to use",
    )
    parser.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="memory bandwidth peak (default 28 cpu, 3350 cuda = H100 SXM)",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one subprocess per (impl, N, dtype) (default: on for cpu)",
    )
    parser.add_argument(
        "--cold-compile",
        action="store_true",
        help="disable inductor's caches so compile_s is a cold compilation",
    )
    parser.add_argument(
        "--report", default=None, metavar="JSON", help="print a markdown table of a results file"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/<device>-<date>.json)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.repeats is None:
        args.repeats = 100 if cuda else 20
    if args.baseline_repeats is None:
        args.baseline_repeats = 20 if cuda else 5
    if args.slow_repeats is None:
        args.slow_repeats = 10 if cuda else 3
    if args.peak_gbps is None:
        args.peak_gbps = DEFAULT_PEAK_GBPS[args.device]
    if args.isolate is None:
        args.isolate = not cuda
    if args.out is None:
        date = datetime.date.today().isoformat()
        args.out = str(REPO_ROOT / "bench" / "results" / f"{args.device}-{date}.json")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report is not None:
        print(markdown_table(json.loads(Path(args.report).read_text())))
        return 0
    if args.worker is not None:
        rows = run_impl(json.loads(args.worker))
        print("@@ROWS@@" + json.dumps(rows), flush=True)
        return 0
    import opd_fast

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    header = {
        "benchmark": "opd_fast.opd_loss vs opd_fast.op.reference.opd_loss",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
        "machine": machine_info(device),
        **git_info(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "build_info": {**opd_fast.build_info(), **extension_fingerprint()},
        "loadavg_at_start": list(os.getloadavg()),
        "peak_gbps": args.peak_gbps,
        "bytes_model": "fwd: 2*N*V*element_size (read S, T); fwd_bwd: 3*N*V*element_size "
        "(read S, T, write dS)",
        "memory_method": (
            "cuda: max_memory_allocated - memory_allocated before the call, peak stats reset"
            if device.type == "cuda"
            else "cpu: fresh subprocess per (impl, N, dtype); VmHWM - VmRSS before the call after "
            "resetting VmHWM via /proc/self/clear_refs (glibc may reuse retained memory for "
            "allocations < 32 MB)"
        ),
        "notes": [
            "eager = opd_fast.op.reference.opd_loss as written (readable statement of the spec): "
            "dense (N, V) masks and a tie-exact top-k built from torch.topk + cumsum over V",
            "eager_careful is NOT the reference: a hand-written eager student_topk/pg version "
            "(torch.topk tie order); its loss may differ from the reference on tied logits",
            "compile = torch.compile(reference.opd_loss, dynamic=False); compile_s = first call "
            "- median (the on-disk inductor cache may shorten it)",
            "opd_fast is called with check_values=True (its default: one host sync per call)",
        ],
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
    }
    worker_args = {k: v for k, v in vars(args).items() if k != "worker"}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows_out: list[dict] = []
    begin = time.perf_counter()

    def save():
        add_derived(rows_out, args, args.peak_gbps)
        document = {
            **header,
            "loadavg_at_save": list(os.getloadavg()),
            "targets": check_targets(rows_out),
            "rows": rows_out,
        }
        out_path.write_text(json.dumps(document, indent=1) + "\n")

    print(
        f"opd_fast bench on {header['machine'].get('gpu', header['machine'].get('cpu'))}, "
        f"torch {torch.__version__}, commit {header['commit'][:12]}, "
        f"build {header['build_info']}",
        flush=True,
    )
    for dtype in args.dtypes:
        for rows in sorted(args.n):
            for impl in args.impls:
                repeats = {"opd_fast": args.repeats, "eager": args.slow_repeats}.get(
                    impl, args.baseline_repeats
                )
                reason = skip_reason(
                    impl, rows, dtype, args, rows_out, time.perf_counter() - begin, device, repeats
                )
                if reason is not None:
                    for mode in args.modes:
                        rows_out.append(
                            {
                                "impl": impl,
                                "mode": mode,
                                "N": rows,
                                "dtype": dtype,
                                "status": "skipped",
                                "reason": reason,
                            }
                        )
                    print(f"  {impl:<14} N={rows:<6} {dtype}: skipped: {reason}", flush=True)
                    save()
                    continue
                slow = impl == "eager"
                spec = {
                    "impl": impl,
                    "rows": rows,
                    "dtype": dtype,
                    "modes": args.modes,
                    "repeats": repeats,
                    "slow": slow,
                    "args": worker_args,
                }
                started = time.perf_counter()
                if args.isolate:
                    timeout = 60 + len(args.modes) * (3 * args.max_row_s + args.max_call_s + 600)
                    result, why = run_isolated(spec, timeout)
                    if result is None:
                        result = error_rows(spec, why)
                else:
                    try:
                        result = run_impl(spec)
                    except Exception as error:  # e.g. out of memory making the inputs
                        result = error_rows(spec, f"{type(error).__name__}: {error}"[:500])
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows_out.extend(result)
                save()
                for row in result:
                    if row["status"] == "ok":
                        extra = f", compile {row['compile_s']:.1f} s" if "compile_s" in row else ""
                        print(
                            f"  {impl:<14} N={rows:<6} {dtype} {row['mode']:<7} median "
                            f"{row['median_ms']:.2f} ms (p10 {row['p10_ms']:.2f}, p90 "
                            f"{row['p90_ms']:.2f}, {row['repeats']} reps), peak +"
                            f"{row['peak_mem_bytes'] / 2**20:.0f} MiB{extra}",
                            flush=True,
                        )
                    else:
                        print(
                            f"  {impl:<14} N={rows:<6} {dtype} {row['mode']:<7} "
                            f"{row['status']}: {row.get('reason')}",
                            flush=True,
                        )
                print(f"    ({time.perf_counter() - started:.0f} s)", flush=True)
    save()
    print()
    print(format_table(rows_out, args.peak_gbps))
    targets = check_targets(rows_out)
    if targets:
        print("\nTargets (opd_fast fwd_bwd: >= 5x eager, >= 2x compile, peak <= 1.05 x grad):")
        for t in targets:

            def fmt(key, t=t):
                return "-" if t.get(key) is None else f"{t[key]:.2f}"

            print(
                f"  N={t['N']} {t['dtype']}: vs eager {fmt('speedup_vs_eager')}x "
                f"{_verdict(t.get('meets_5x_eager'))}, vs compile {fmt('speedup_vs_compile')}x "
                f"{_verdict(t.get('meets_2x_compile'))}, peak/grad "
                f"{fmt('peak_mem_over_grad')} {_verdict(t.get('meets_memory'))}"
                f" (CPU-time ratios: vs eager {fmt('cpu_time_speedup_vs_eager')}x, vs compile "
                f"{fmt('cpu_time_speedup_vs_compile')}x)"
            )
    print(f"\nwrote {out_path}")
    return 0


def _verdict(met):
    return "n/a" if met is None else ("MET" if met else "NOT MET")


if __name__ == "__main__":
    sys.exit(main())
