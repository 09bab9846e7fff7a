"""A short OPD run of two tiny random Qwen3 models, for throughput on a device:

    python bench/train_smoke.py --device cuda --out bench/results/gpu-local/train-smoke.json
    python bench/train_smoke.py --device cpu --steps 3      # the same path on a CPU
    torchrun --standalone --nproc-per-node 1 bench/train_smoke.py --device cuda  # FSDP2
    python bench/train_smoke.py --device cuda --teacher-server          # a payload teacher
    python bench/train_smoke.py --device cuda --micro-batch-tokens 4096 --pack   # packed rows
    python bench/train_smoke.py --device cuda --max-staleness 1   # rollouts beside training

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


def start_teacher_server(teacher: str, device: str, folder: str):
    """`opd-fast serve-teacher` of `teacher` on a free port: (process, its URL) once it answers."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(os.path.join(folder, "server.log"), "w")  # noqa: SIM115 (the server's lifetime)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "opd_fast",
            "serve-teacher",
            "--model",
            teacher,
            "--port",
            str(port),
            "--device",
            device,
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the teacher server did not start; see {log.name}") from None
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256, help="student width; teacher 2x")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, help="output rows (default: the tokenizer's)")
    parser.add_argument("--loss-path", default="fused_linear", choices=["fused_linear", "logits"])
    parser.add_argument(
        "--teacher-server",
        action="store_true",
        help="score with `opd-fast serve-teacher` on the same device (a payload teacher)",
    )
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="rollout_engine")
    parser.add_argument("--max-staleness", type=int, default=0, help="rollouts beside training")
    parser.add_argument("--micro-batch-tokens", type=int, default=0)
    parser.add_argument("--pack", action="store_true", help="pack_sequences (needs the above)")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="opd-train-smoke-") as folder:
        tokenizer = tiny_tokenizer()
        student = save_tiny_model(os.path.join(folder, "student"), hidden_size=args.hidden,
                                  num_layers=args.layers, seed=1, tokenizer=tokenizer,
                                  vocab_size=args.vocab)  # fmt: skip
        teacher = save_tiny_model(os.path.join(folder, "teacher"), hidden_size=2 * args.hidden,
                                  num_layers=args.layers, seed=2, tokenizer=tokenizer,
                                  vocab_size=args.vocab)  # fmt: skip
        prompts = write_prompts(os.path.join(folder, "prompts.jsonl"), count=256)
        server, teacher_keys = None, {}
        if args.teacher_server:
            server, url = start_teacher_server(teacher, args.device, folder)
            teacher_keys = {"teacher_url": url}
        config = make_config(
            {
                **teacher_keys,
                "loss_path": args.loss_path,
                "rollout_engine": args.engine,
                "max_staleness": args.max_staleness,
                "micro_batch_tokens": args.micro_batch_tokens,
                "pack_sequences": args.pack,
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
        try:
            summary = train(config)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
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
        "vocab": args.vocab or len(tokenizer),
        "loss_path": steps[0]["loss_path"],
        "rollout_engine": args.engine,
        "max_staleness": args.max_staleness,
        "step_seconds_median": statistics.median(r["step_seconds"] for r in measured),
        "teacher": "server (payload)" if args.teacher_server else "in process",
        "micro_batch_tokens": args.micro_batch_tokens,
        "pack_sequences": args.pack,
        "computed_tokens_per_real_token_median": statistics.median(
            r["computed_tokens_per_real_token"] for r in measured
        ),
        "train_peak_memory_mib_max": max(r["train_peak_memory_mib"] for r in steps),
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
