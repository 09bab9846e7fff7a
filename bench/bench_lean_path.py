"""The lean path at scale on CPU ranks: peak memory and step time of 2-rank gloo training steps
with tiny Qwen3 models whose output tables have V = 151,936 rows, `fused_linear` against
`logits`, for every teacher kind; and the padding of micro-batches by sequences, by tokens and
packed, on responses whose lengths spread 10x.

    python bench/bench_lean_path.py --out bench/results/lean-path-cpu.json
    python bench/bench_lean_path.py --teachers replicate --ranks 1   # one process, one kind

Teachers: `replicate` and `shard` (in process, teacher_sharding), `server` (`opd-fast
serve-teacher`, a payload teacher), `openai` (vLLM's CPU build serving the teacher, when the
python given by --vllm-python has vllm; variant teacher_topk, which it scores exactly).

Memory is each step's `train_peak_memory_mib` (RSS of scoring + update, the largest over
ranks) and what scoring added above what was resident when it began (`train_start_memory_mib`):
for these tiny models that is almost all the loss's. Times are medians over the steps after
the first; the load average is recorded before each run. The models are random: this measures
the machinery, not learning.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from opd_fast.toy.tiny import save_tiny_model, tiny_tokenizer, write_prompts  # noqa: E402
from opd_fast.training.step.micro_batches import plan  # noqa: E402

VOCAB = 151_936
TEACHERS = ("replicate", "shard", "server", "openai")


def load_average() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, log: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}); log: {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up in {timeout} s; log: {log}") from None
            time.sleep(1)


def start_server(kind: str, teacher: str, folder: str, vllm_python: str):
    """(process, config keys) of a teacher server of `kind` serving `teacher`."""
    port = free_port()
    log = os.path.join(folder, f"{kind}-server.log")
    if kind == "server":
        command = [sys.executable, "-m", "opd_fast", "serve-teacher", "--model", teacher,
                   "--port", str(port), "--device", "cpu"]  # fmt: skip
        health, keys = f"http://127.0.0.1:{port}/health", {
            "teacher_url": f"http://127.0.0.1:{port}"
        }
    else:
        command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", f"--model={teacher}",
                   "--host=127.0.0.1", f"--port={port}", "--served-model-name=teacher",
                   "--dtype=float32", "--max-model-len=256", "--max-num-seqs=64",
                   "--max-logprobs=20", "--enforce-eager", "--generation-config=vllm"]  # fmt: skip
        health, keys = f"http://127.0.0.1:{port}/health", {
            "teacher_url": f"http://127.0.0.1:{port}/v1",
            "teacher_api": "openai",
            "teacher_model": "teacher",
            "variant": "teacher_topk",
        }
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    wait_for(health, process, log)
    return process, keys


MALLOC_ENV: dict = {}  # --malloc-mmap-threshold: the C allocator's policy for every run


def run_training(config: dict, ranks: int, folder: str, name: str) -> list[dict]:
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as handle:
        json.dump(config, handle)
    command = [sys.executable, "-m", "opd_fast", "train", "--config", path]
    if ranks > 1:
        command += ["--nproc-per-node", str(ranks)]
    env = dict(os.environ, OPD_FAST_THREADS="1", OMP_NUM_THREADS="1", **MALLOC_ENV)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    with open(os.path.join(config["run_dir"], "metrics.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r.get("kind") == "train"]


def summarise(records: list[dict]) -> dict:
    later = records[1:] or records
    return {
        "train_peak_memory_mib": max(r["train_peak_memory_mib"] for r in records),
        "scoring_added_mib": max(
            r["train_peak_memory_mib"] - r["train_start_memory_mib"] for r in records
        ),
        "step_seconds_median": statistics.median(r["step_seconds"] for r in later),
        "score_seconds_median": statistics.median(r["score_seconds"] for r in later),
        "teacher_seconds_median": statistics.median(r["teacher_seconds"] for r in later),
        "response_tokens": records[0]["response_tokens"],
        "loss_path": records[0]["loss_path"],
    }


def padding(sequences: int, seed: int, micro_batch_size: int, budget: int) -> list[dict]:
    """Token positions computed per real token for lengths spread 10x (prompt 12 tokens, a
    response of 12 to 120), by each micro-batch split."""
    rng = random.Random(seed)
    lengths = [12 + rng.randint(12, 120) for _ in range(sequences)]
    rows = []
    for label, planned in (
        (f"micro_batch_size={micro_batch_size}", plan(lengths, micro_batch_size)),
        (f"micro_batch_tokens={budget}", plan(lengths, micro_batch_size, budget)),
        (f"micro_batch_tokens={budget}, packed", plan(lengths, micro_batch_size, budget, True)),
    ):
        computed = sum(
            len(batch) * max(sum(lengths[i] for i in row) for row in batch) for batch in planned
        )
        rows.append(
            {
                "split": label,
                "micro_batches": len(planned),
                "computed_per_real_token": computed / sum(lengths),
                "shortest": min(lengths),
                "longest": max(lengths),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=TEACHERS)
    parser.add_argument("--paths", nargs="+", default=["fused_linear", "logits"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--rollouts-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vllm-python", default="/work/venv-vllm/bin/python")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        help="bytes: glibc's fixed mmap threshold for the runs (MALLOC_MMAP_THRESHOLD_). By "
        "default it grows to 32 MiB as blocks are freed, and freed blocks under it stay "
        "resident: RSS then keeps what scoring freed, not only what it holds",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.malloc_mmap_threshold:
        MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)

    folder = tempfile.mkdtemp(prefix="opd-lean-")
    tokenizer = tiny_tokenizer()
    student = save_tiny_model(f"{folder}/student", vocab_size=VOCAB, hidden_size=args.hidden,
                              num_layers=2, seed=1, tokenizer=tokenizer)  # fmt: skip
    teacher = save_tiny_model(f"{folder}/teacher", vocab_size=VOCAB,
                              hidden_size=2 * args.hidden, num_layers=2, seed=2,
                              tokenizer=tokenizer)  # fmt: skip
    prompts = write_prompts(f"{folder}/prompts.jsonl", count=64)
    base = dict(
        student=student, teacher=teacher, train_data=prompts, eval_data=prompts,
        steps=args.steps, prompts_per_step=args.prompts_per_step,
        rollouts_per_prompt=args.rollouts_per_prompt, max_new_tokens=args.max_new_tokens,
        micro_batch_size=8, teacher_batch_size=8, rollout_batch_size=64, eval_every=0,
        eval_max_prompts=args.ranks, checkpoint_every=0, progress=False, lr=1e-4, k=16,
        device="cpu",
    )  # fmt: skip
    results = {
        "machine": {"cores": os.cpu_count(), "ranks": args.ranks, "vocab": VOCAB},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": [],
        "padding": padding(64, 0, 8, 512),
    }
    for row in results["padding"]:
        print(json.dumps(row), flush=True)
    for kind in args.teachers:
        server, keys = None, {}
        if kind == "openai" and not os.path.exists(args.vllm_python):
            print(f"openai: no vLLM python at {args.vllm_python}, skipped", flush=True)
            continue
        if kind in ("server", "openai"):
            server, keys = start_server(kind, teacher, folder, args.vllm_python)
        elif args.ranks > 1:
            keys = {"teacher_sharding": kind}
        try:
            for path in args.paths:
                name = f"{kind}-{path}"
                config = dict(base, **keys, loss_path=path, run_dir=f"{folder}/{name}")
                before = load_average()
                started = time.perf_counter()
                records = run_training(config, args.ranks, folder, name)
                row = {"teacher": kind, **summarise(records), "load_average_before": before,
                       "load_average_after": load_average(),
                       "wall_seconds": time.perf_counter() - started}  # fmt: skip
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
    by_kind = {}
    for row in results["runs"]:
        by_kind.setdefault(row["teacher"], {})[row["loss_path"]] = row
    print("\n| teacher | fused peak MiB | logits peak MiB | fused added | logits added | "
          "added ratio | fused step s | logits step s | time ratio |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, pair in by_kind.items():
        if {"fused_linear", "logits"} <= pair.keys():
            fused, logits = pair["fused_linear"], pair["logits"]
            added = fused["scoring_added_mib"] / logits["scoring_added_mib"]
            time_ratio = fused["step_seconds_median"] / logits["step_seconds_median"]
            print(f"| {kind} | {fused['train_peak_memory_mib']:.0f} | "
                  f"{logits['train_peak_memory_mib']:.0f} | {fused['scoring_added_mib']:.0f} | "
                  f"{logits['scoring_added_mib']:.0f} | {added:.3f} | "
                  f"{fused['step_seconds_median']:.2f} | {logits['step_seconds_median']:.2f} | "
                  f"{time_ratio:.2f} |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
