"""Rollout throughput of one rollout engine: response tokens per second while sampling the
toy recipe's rollout batch (64 prompts x 4 responses, up to 24 new tokens, temperature 1), or
the same batch from a small random Qwen3 on a GPU.

    python bench/bench_rollout.py --engine hf                       # toy student, CPU
    python bench/bench_rollout.py --engine vllm                     # (in the vLLM venv)
    python bench/bench_rollout.py --engine vllm --model random-qwen3 --device cuda --dtype bfloat16

One engine per run (a vLLM engine owns process-wide state); each run appends its row to --out
(default bench/results/rollout-<device>.json): engine, model, device, dtype, the batch, the
engine's start-up seconds, the median and spread of tokens/s over --rounds rounds after one
warm-up round, the load average before and after, machine and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import git_info, machine_info  # noqa: E402

from opd_fast.models.loading import Placement  # noqa: E402
from opd_fast.toy import resolve_toy  # noqa: E402
from opd_fast.toy.tiny import save_tiny_model, tiny_tokenizer, write_prompts  # noqa: E402
from opd_fast.training.data import load_examples  # noqa: E402
from opd_fast.training.pair import load_student  # noqa: E402
from opd_fast.training.rollouts import (  # noqa: E402
    SamplingSettings,
    make_engine,
    sample_examples,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("hf", "vllm"), required=True)
    parser.add_argument("--model", default="toy", help="toy | random-qwen3")
    parser.add_argument("--hidden", type=int, default=1024, help="random-qwen3 width")
    parser.add_argument("--layers", type=int, default=8, help="random-qwen3 depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="opd-rollout-bench-") as folder:
        if args.model == "toy":
            paths = resolve_toy({"student": "toy", "train_data": "toy"}, progress=False)
        elif args.model == "random-qwen3":  # the toy world's prompts are not needed: no build
            paths = {
                "student": save_tiny_model(
                    os.path.join(folder, "student"),
                    hidden_size=args.hidden,
                    num_layers=args.layers,
                    tokenizer=tiny_tokenizer(),
                ),
                "train_data": write_prompts(os.path.join(folder, "p.jsonl"), count=args.prompts),
            }
        else:
            raise SystemExit(f"--model must be toy or random-qwen3, got {args.model!r}")
        student_path = paths["student"]
        placement = Placement.resolve(args.device, args.dtype, "auto")
        student = load_student(student_path, placement, trainable=False, progress=False)
        examples = load_examples(paths["train_data"])[: args.prompts]
        started = time.perf_counter()
        engine = make_engine(
            args.engine,
            student.student,
            student.tokenizer,
            model_path=student_path,
            batch_size=args.prompts * args.repeats,
            max_model_len=128 + args.max_new_tokens,
            max_num_seqs=args.prompts * args.repeats,
        )
        startup_s = time.perf_counter() - started
        settings = SamplingSettings(
            eos_ids=tuple(student.eos_ids),
            max_new_tokens=args.max_new_tokens,
            temperature=1.0,
            vocab_limit=student.vocab,
        )
        rates, lengths = [], []
        for round_index in range(args.rounds + 1):
            torch.manual_seed(round_index)
            engine.wake()
            if placement.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            batch, _ = sample_examples(
                engine,
                student.tokenizer,
                examples,
                repeats=args.repeats,
                template="{prompt}",
                settings=settings,
            )
            if placement.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            engine.sleep()
            if round_index:  # the first round warms up
                rates.append(batch.num_response_tokens / seconds)
                lengths.append(batch.num_response_tokens / len(batch.responses))
        engine.close()

    row = {
        "engine": args.engine,
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "sequences": args.prompts * args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "mean_response_tokens": statistics.mean(lengths),
        "startup_s": startup_s,
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "rounds": args.rounds,
        "torch": torch.__version__,
        "vllm": _vllm_version(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": machine_info(placement.device),
        "git": git_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    print(
        f"{args.engine}: {row['tokens_per_s_median']:.0f} tokens/s (median of {args.rounds}; "
        f"{row['tokens_per_s_min']:.0f}-{row['tokens_per_s_max']:.0f}), start-up "
        f"{startup_s:.1f} s, load {load_before[0]:.1f} -> {row['load_average_after'][0]:.1f}"
    )
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"rollout-{args.device}.json"
    )
    rows = []
    if os.path.exists(out):
        with open(out) as handle:
            rows = json.load(handle)
    rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(rows, handle, indent=1)


def _vllm_version() -> str | None:
    try:
        import vllm
    except ImportError:
        return None
    return vllm.__version__


if __name__ == "__main__":
    main()
