"""Benchmark of the fused linear OPD loss (opd_fast.linear_opd_loss) against two PyTorch paths.

The problem: student hidden states h (N, H), the lm_head weight W (V, H), teacher logits
T (N, V) (an input, like a teacher's answer); forward + backward, gradients w.r.t. h and W;
student_topk / pg, k = 16.

Implementations (--impls):
  fused         opd_fast.linear_opd_loss(h, W, T): token chunks (default chunk from the memory
                budget, opd_fast.op.linear.CHUNK_MEMORY_BYTES), gradients formed in the forward
  materialised  logits = h @ W.T, then opd_fast.opd_loss(logits, T), autograd through both
  chunked_torch a careful chunked PyTorch version, as the chunked losses of verl and TRL are:
                per chunk of --torch-chunk tokens, logits, two log-softmaxes, torch.topk,
                gathers, the pg loss, and its backward at once (autograd.grad into h's chunk
                and W's gradient); loss only, no metrics (the two others compute all of them)

Per row (impl, N, H, dtype, interleave): the median / min / max wall time of --repeats calls
after one warm-up, their spread (max / min), and the peak memory above the inputs.
--interleave off eager compile alloc runs each timed (and warm-up) call after that kind of
torch work on (N, V) tensors (bench/interleave.py, with the teacher logits as both inputs);
off = back to back. The kinds run one after another in the same process, from the same inputs;
the rows of the other kinds give x_back_to_back, their median over the `off` row's. Each
(impl, N, H, dtype) runs in a fresh subprocess: after the inputs are made and one small
warm-up call ran, the process's RSS high-water mark is reset (/proc/self/clear_refs), one
call runs, and VmHWM - VmRSS(before) is the peak (CPU); on CUDA max_memory_allocated -
memory_allocated after reset_peak_memory_stats. The load average is recorded with every row:
on a shared machine, compare rows of the same run only.

Example (the issue's CPU target):
  python bench/bench_linear.py --device cpu --n 4096 --hidden 256 --dtypes fp32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from interleave import KINDS as INTERLEAVE_KINDS  # bench/interleave.py
from interleave import make_interleave
from machine import git_info, machine_info  # bench/machine.py

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("fused", "materialised", "chunked_torch")


# --------------------------------------------------------------------------------------------
# Implementations: each returns (loss, grad_hidden, grad_weight)
# --------------------------------------------------------------------------------------------


def fused(hidden, weight, teacher_logits, k, chunk_tokens=None):
    import opd_fast

    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    out = opd_fast.linear_opd_loss(hidden, weight, teacher_logits, k=k, chunk_tokens=chunk_tokens)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    return out.loss.detach(), *grads


def materialised(hidden, weight, teacher_logits, k, chunk_tokens=None):
    import opd_fast

    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    logits = hidden @ weight.T
    out = opd_fast.opd_loss(logits, teacher_logits, k=k)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    return out.loss.detach(), *grads


def _chunk_pg_loss(student_logits, teacher_logits, k):
    """Sum over the chunk's rows of the student_topk / pg loss: value -sum A, gradient that of
    the surrogate -sum A.detach() * log p (docs/math.md, pg)."""
    student_log_probs = torch.log_softmax(student_logits.float(), dim=-1)
    with torch.no_grad():
        teacher_log_probs = torch.log_softmax(teacher_logits.float(), dim=-1)
        ids = torch.topk(student_logits, k, dim=-1).indices
        teacher_at = teacher_log_probs.gather(1, ids)
    student_at = student_log_probs.gather(1, ids)
    with torch.no_grad():
        weights = torch.softmax(student_at, dim=-1)
        advantages = weights * (teacher_at - student_at)
    surrogate = -(advantages * student_at).sum()
    value = -advantages.sum()
    return value + (surrogate - surrogate.detach())


def chunked_torch(hidden, weight, teacher_logits, k, chunk_tokens=None):
    rows = hidden.shape[0]
    chunk = chunk_tokens or 1024
    weight_leaf = weight.detach().requires_grad_(True)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight)
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        hidden_chunk = hidden[start:end].detach().requires_grad_(True)
        loss = _chunk_pg_loss(hidden_chunk @ weight_leaf.T, teacher_logits[start:end], k) / rows
        chunk_grad_hidden, chunk_grad_weight = torch.autograd.grad(
            loss, (hidden_chunk, weight_leaf)
        )
        grad_hidden[start:end] = chunk_grad_hidden
        grad_weight += chunk_grad_weight
        total += loss.detach().float()
    return total, grad_hidden, grad_weight


IMPLEMENTATIONS = {"fused": fused, "materialised": materialised, "chunked_torch": chunked_torch}


# --------------------------------------------------------------------------------------------
# One row, in its own process
# --------------------------------------------------------------------------------------------


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_inputs(rows, hidden_size, vocab, dtype, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator, device=device).to(dtype)
    weight = (
        torch.randn(vocab, hidden_size, generator=generator, device=device) / hidden_size**0.5
    ).to(dtype) * 3
    teacher = torch.empty(rows, vocab, dtype=dtype, device=device)
    for start in range(0, rows, 256):  # the teacher's logits: the student's, perturbed
        block = hidden[start : start + 256].float() @ weight.float().T
        noise = torch.randn(block.shape, generator=generator, device=device)
        teacher[start : start + 256] = (block + noise).to(dtype)
    return hidden, weight, teacher


def run_row(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    function = IMPLEMENTATIONS[args.impl]
    chunk = args.torch_chunk if args.impl == "chunked_torch" else args.chunk_tokens
    small = make_inputs(8, args.hidden, args.vocab, dtype, device)
    function(*small, args.k, chunk)  # warm-up: thread pools, kernels, allocator
    del small
    hidden, weight, teacher = make_inputs(args.n, args.hidden, args.vocab, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = _status_kib("VmRSS") * 1024
    started = time.perf_counter()
    result = function(hidden, weight, teacher, args.k, chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status_kib("VmHWM") * 1024 - before
    first_s = time.perf_counter() - started
    loss = float(result[0])
    del result
    rows = []
    for kind in args.interleave:
        between = make_interleave(kind, teacher, teacher)
        if kind != args.interleave[0]:  # the first kind's warm-up was the measured call
            between()
            function(hidden, weight, teacher, args.k, chunk)
        times = []
        loads = []
        for _ in range(args.repeats):
            between()
            loads.append(os.getloadavg()[0])
            started = time.perf_counter()
            function(hidden, weight, teacher, args.k, chunk)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        rows.append(
            {
                "impl": args.impl,
                "n": args.n,
                "hidden": args.hidden,
                "vocab": args.vocab,
                "dtype": args.dtype,
                "k": args.k,
                "chunk_tokens": chunk,
                "interleave": kind,
                "loss": loss,
                "first_call_s": first_s,
                "median_ms": 1e3 * statistics.median(times) if times else 1e3 * first_s,
                "min_ms": 1e3 * min(times) if times else None,
                "max_ms": 1e3 * max(times) if times else None,
                "spread": max(times) / min(times) if times else None,
                "times_ms": [1e3 * t for t in times],
                "peak_memory_above_inputs_mib": peak / 2**20,
                "load_average_1min": loads or [os.getloadavg()[0]],
            }
        )
    return rows


def _subprocess_rows(args, impl, rows, hidden_size, dtype) -> list[dict]:
    """The rows of (impl, N, H, dtype), one per --interleave kind, from a fresh process."""
    argv = [sys.executable, __file__, "--row", "--impl", impl, "--n", str(rows)]
    argv += ["--hidden", str(hidden_size), "--dtypes", dtype, "--device", args.device]
    argv += ["--vocab", str(args.vocab), "--k", str(args.k), "--repeats", str(args.repeats)]
    argv += ["--torch-chunk", str(args.torch_chunk), "--interleave", *args.interleave]
    if args.chunk_tokens:
        argv += ["--chunk-tokens", str(args.chunk_tokens)]
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=args.max_row_s)
    except subprocess.TimeoutExpired:
        return [{"impl": impl, "n": rows, "hidden": hidden_size, "dtype": dtype,
                 "status": "failed", "error": f"timed out after {args.max_row_s} s"}]  # fmt: skip
    if completed.returncode != 0:
        return [{"impl": impl, "n": rows, "hidden": hidden_size, "dtype": dtype,
                 "status": "failed", "error": completed.stderr[-2000:]}]  # fmt: skip
    return [
        {"status": "ok", **row} for row in json.loads(completed.stdout.strip().splitlines()[-1])
    ]


def _ratios(rows):
    """Per (n, hidden, dtype, interleave): fused's time and memory over the materialised path's;
    per row, its median over the back-to-back (interleave off) row of the same impl."""
    table = {}
    for row in rows:
        if row.get("status") == "ok":
            table[(row["n"], row["hidden"], row["dtype"], row["interleave"], row["impl"])] = row
    for row in rows:
        if row.get("status") != "ok":
            continue
        key = (row["n"], row["hidden"], row["dtype"], row["interleave"])
        back_to_back = table.get((*key[:3], "off", row["impl"]))
        if row["interleave"] != "off" and back_to_back:
            row["x_back_to_back"] = row["median_ms"] / back_to_back["median_ms"]
        if row["impl"] != "fused":
            continue
        for other in ("materialised", "chunked_torch"):
            base = table.get((*key, other))
            if base:
                row[f"time_vs_{other}"] = row["median_ms"] / base["median_ms"]
                row[f"memory_vs_{other}"] = (
                    row["peak_memory_above_inputs_mib"] / base["peak_memory_above_inputs_mib"]
                )


def report(rows):
    interleaved = any(row.get("interleave", "off") != "off" for row in rows)
    extra_head, extra_rule = (" between | max / min | x back to back |", "---|---|---|")
    if not interleaved:
        extra_head, extra_rule = "", ""
    lines = [
        "| N | H | dtype | impl | median ms (min-max) | peak MiB above inputs | "
        "time / materialised | memory / materialised | time / chunked_torch | load |" + extra_head,
        "|---|---|---|---|---|---|---|---|---|---|" + extra_rule,
    ]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"| {row['n']} | {row['hidden']} | {row['dtype']} | {row['impl']} | "
                         "failed | | | | | |" + (" | | |" if interleaved else ""))  # fmt: skip
            continue

        def ratio(name, row=row):
            value = row.get(name)
            return "" if value is None else f"{value:.3f}"

        spread = f"{row['median_ms']:,.0f} ({row['min_ms'] or 0:,.0f}-{row['max_ms'] or 0:,.0f})"
        load = "-".join(f"{x:.1f}" for x in (min(row["load_average_1min"]),
                                             max(row["load_average_1min"])))  # fmt: skip
        extra = ""
        if interleaved:
            extra = (
                f" {row.get('interleave', 'off')} | {row['spread'] or 0:.2f} | "
                f"{ratio('x_back_to_back')} |"
            )
        lines.append(
            f"| {row['n']} | {row['hidden']} | {row['dtype']} | {row['impl']} | {spread} | "
            f"{row['peak_memory_above_inputs_mib']:,.0f} | {ratio('time_vs_materialised')} | "
            f"{ratio('memory_vs_materialised')} | {ratio('time_vs_chunked_torch')} | {load} |"
            + extra
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 896])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="fused; default: budget")
    parser.add_argument("--torch-chunk", type=int, default=1024, help="chunked_torch's chunk")
    parser.add_argument(
        "--interleave",
        nargs="+",
        default=["off"],
        choices=INTERLEAVE_KINDS,
        help="torch work before each timed call (bench/interleave.py); off = back to back",
    )
    parser.add_argument("--max-row-s", type=float, default=900)
    parser.add_argument("--out", default=None)
    parser.add_argument("--report", default=None, help="print a results file as a table")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        with open(args.report) as handle:
            print(report(json.load(handle)["rows"]))
        return
    if args.row:
        args.n, args.hidden, args.dtype = args.n[0], args.hidden[0], args.dtypes[0]
        print(json.dumps(run_row(args)))
        return
    date = datetime.date.today().isoformat()
    out = args.out or str(REPO_ROOT / "bench" / "results" / f"linear-{args.device}-{date}.json")
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "argv": sys.argv,
        "machine": machine_info(torch.device(args.device)),
        "git": git_info(),
    }
    rows = []
    for dtype in args.dtypes:
        for hidden_size in args.hidden:
            for rows_n in args.n:
                for impl in args.impls:
                    new_rows = _subprocess_rows(args, impl, rows_n, hidden_size, dtype)
                    rows.extend(new_rows)
                    _ratios(rows)
                    for row in new_rows:
                        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}),
                              flush=True)  # fmt: skip
                    with open(out, "w") as handle:
                        json.dump({**header, "rows": rows}, handle, indent=1)
    print(report(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
