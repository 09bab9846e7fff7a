"""A short OPD run of two tiny random Qwen3 models, for throughput on a device:

    python bench/train_smoke.py --device cuda --out bench/results/gpu-local/train-smoke.json
    python bench/train_smoke.py --device cpu --steps 3      # the same path on a CPU
    torchrun --standalone --nproc-per-node 1 bench/train_smoke.py --device cuda  # FSDP2

Prints (and writes as JSON) the medians over the steps after the first of the trainer's own
rollout, teacher-scoring and training tokens per second, and the peak memory. The models are
random: this measures the machinery (generation with a KV cache, chunked teacher scoring, the
fused loss and the update), not learning.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch

from opd_fast.models.loading import resolve_device, resolve_dtype
from opd_fast.toy.tiny import save_tiny_model, tiny_tokenizer, write_prompts
from opd_fast.training.config import make_config
from opd_fast.training.trainer import train

RATES = ("rollout_tokens_per_s", "teacher_tokens_per_s", "train_tokens_per_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256, help="student width; teacher 2x")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="opd-train-smoke-") as folder:
        tokenizer = tiny_tokenizer()
        student = save_tiny_model(os.path.join(folder, "student"), hidden_size=args.hidden,
                                  num_layers=args.layers, seed=1, tokenizer=tokenizer)  # fmt: skip
        teacher = save_tiny_model(os.path.join(folder, "teacher"), hidden_size=2 * args.hidden,
                                  num_layers=args.layers, seed=2, tokenizer=tokenizer)  # fmt: skip
        prompts = write_prompts(os.path.join(folder, "prompts.jsonl"), count=256)
        config = make_config(
            {
                "student": student,
                "teacher": teacher,
                "train_data": prompts,
                "eval_data": prompts,
                "run_dir": os.path.join(folder, "run"),
                "device": args.device,
                "dtype": args.dtype,
                "steps": args.steps,
                "prompts_per_step": args.prompts_per_step,
                "rollouts_per_prompt": 4,
                "max_new_tokens": args.max_new_tokens,
                "eval_every": 0,
                "eval_max_prompts": 16,
                "checkpoint_every": 0,
                "lr": 1e-4,
                "progress": False,
            }
        )
        summary = train(config)
        with open(os.path.join(config.run_dir, "metrics.jsonl")) as handle:
            steps = [r for r in map(json.loads, handle) if r.get("kind") == "train"]
    measured = steps[1:] or steps  # the first step pays for warm-up (kernels, allocator)
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "ranks": int(os.environ.get("WORLD_SIZE", "1")),
        "fsdp2": "RANK" in os.environ,  # under torchrun: the student sharded with FSDP2
        "dtype": str(resolve_dtype(config.dtype, resolve_device(config.device))),
        "student_hidden": args.hidden,
        "teacher_hidden": 2 * args.hidden,
        "layers": args.layers,
        "vocab": len(tokenizer),
        "steps": len(steps),
        "steps_measured": len(measured),
        "sequences_per_step": args.prompts_per_step * 4,
        "response_tokens_per_step_median": statistics.median(
            r["response_tokens"] for r in measured
        ),
        **{name + "_median": statistics.median(r[name] for r in measured) for name in RATES},
        "peak_memory_mib": max(r["peak_memory_mib"] for r in steps),
        "wall_seconds": summary["wall_seconds"],
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
    }
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
