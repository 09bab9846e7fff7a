"""How the CPU op's forward+backward holds up on a busy machine, next to careful eager PyTorch.

Three conditions, each measured in a fresh child process so that nothing carries over:
  alone      nothing else running (besides whatever the machine already runs: see the load)
  busy       one competing busy-loop process pinned to the last CPU (taskset), stopped after
  alternate  each call alternates with torch.add(S, T), a fresh (N, V) allocation
and two implementations: the op (opd_fast.opd_loss) and a careful eager full_vocab KL (two
log-softmaxes, one fused sum; what a user would write). --checkouts runs the op of each given
source tree (e.g. the main branch and this one) in the same run, so that ratios compare like
with like on a noisy machine. Prints medians in seconds, the slowdown against `alone`, and the
load average (1 min) before each row.

    PYTHONPATH=. python bench/bench_cpu_load.py --rows 256 --checkouts /work/main .
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONDITIONS = ("alone", "busy", "alternate")


def _child(args) -> None:
    import torch

    import opd_fast

    torch.manual_seed(0)
    student = torch.randn(args.rows, args.vocab)
    teacher = student + 0.5 * torch.randn(args.rows, args.vocab)

    def op_step():
        s = student.requires_grad_(True)
        opd_fast.opd_loss(s, teacher, variant=args.variant, check_values=False).loss.backward()
        s.grad = None

    def eager_step():
        s = student.requires_grad_(True)
        log_p = torch.log_softmax(s, -1)
        log_q = torch.log_softmax(teacher, -1)
        (log_p.exp() * (log_p - log_q)).sum(-1).mean().backward()
        s.grad = None

    step = op_step if args.impl == "op" else eager_step
    step()  # warm-up (first-touch of the allocator's pages, one-time setup)
    times = []
    for _ in range(args.reps):
        if args.condition == "alternate":
            torch.add(student.detach(), teacher)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"median": statistics.median(times), "threads": torch.get_num_threads()}))


def _run_child(args, impl, condition, checkout) -> dict:
    env = dict(os.environ)
    if checkout:
        env["PYTHONPATH"] = os.path.abspath(checkout)
    command = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl]
    command += ["--condition", condition, "--rows", str(args.rows), "--vocab", str(args.vocab)]
    command += ["--reps", str(args.reps), "--variant", args.variant]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--variant", default="full_vocab")
    parser.add_argument("--checkouts", nargs="*", default=[""], help="source trees of the op")
    parser.add_argument("--conditions", nargs="*", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="op", help=argparse.SUPPRESS)
    parser.add_argument("--condition", default="alone", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    rows = [("eager", "")] + [("op", checkout) for checkout in args.checkouts]
    last_cpu = str((os.cpu_count() or 1) - 1)
    results = {}
    print(f"N={args.rows} V={args.vocab} fp32 {args.variant} fwd+bwd, median of {args.reps}")
    for condition in args.conditions:
        busy = None
        if condition == "busy":
            busy = subprocess.Popen(
                ["taskset", "-c", last_cpu, sys.executable, "-c", "while 1: pass"]
            )
        try:
            for impl, checkout in rows:
                load = os.getloadavg()[0]
                got = _run_child(args, impl, condition, checkout)
                results[(impl, checkout, condition)] = got["median"]
                alone = results.get((impl, checkout, "alone"), got["median"])
                name = impl if not checkout else f"op[{checkout}]"
                slowdown = got["median"] / alone
                print(
                    f"{condition:9s} {name:28s} {got['median']:8.3f} s  x{slowdown:5.2f} vs alone"
                    f"  threads={got['threads']}  load={load:.2f}",
                    flush=True,
                )
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()


if __name__ == "__main__":
    main()
