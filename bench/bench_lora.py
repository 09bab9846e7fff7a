"""LoRA vs full fine-tuning on the toy world (the demo recipe, `opd-fast demo`): per run, the
trainable fraction of the student's parameters, the final checkpoint's size (the whole step
folder, and its weights alone: the model's safetensors or the adapter's) and the gap recovery
(summary.json); then the means and seed spreads (sample std) of both, and LoRA's gap recovery
as a fraction of full fine-tuning's.

LoRA's learning rate is chosen first by a sweep on one seed that is not an evaluation seed
(--sweep-seed, --sweep-lrs: the lr with the best gap recovery), unless --lora-lr fixes it. The
results file is rewritten after every run, so a cut-short invocation leaves what it measured.

    python bench/bench_lora.py --out bench/results/lora-toy.json
    python bench/bench_lora.py --lora-lr 1e-2 --seeds 0 --out /tmp/lora.json   # no sweep
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from opd_fast.training.lora import parameter_counts
from opd_fast.training.recipes import recipe
from opd_fast.training.trainer import Trainer


def folder_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(parent, name))
        for parent, _, names in os.walk(path)
        for name in names
    )


def weight_bytes(step_dir: str) -> int:
    """The checkpoint's weights: model/*.safetensors, or the adapter's safetensors."""
    total = 0
    for sub in ("model", "adapter"):
        folder = os.path.join(step_dir, sub)
        if os.path.isdir(folder):
            total += sum(
                os.path.getsize(os.path.join(folder, name))
                for name in os.listdir(folder)
                if name.endswith(".safetensors")
            )
    return total


def one_run(values: dict) -> dict:
    """Train the toy demo with `values` over it; what it trained, wrote and recovered."""
    config = recipe("toy_demo", values)
    started = time.perf_counter()
    trainer = Trainer(config)
    try:
        counts = parameter_counts(trainer.parts.student)
        summary = trainer.run()
    finally:
        trainer.close()
    step_dir = os.path.join(config.run_dir, "checkpoints", f"step_{config.steps:06d}")
    return {
        "seed": config.seed,
        "lr": config.lr,
        "lora_rank": config.lora_rank,
        "trainable_parameters": counts["trainable"],
        "total_parameters": counts["total"],
        "trainable_fraction": counts["trainable"] / counts["total"],
        "checkpoint_bytes": folder_bytes(step_dir),
        "checkpoint_weight_bytes": weight_bytes(step_dir),
        "gap_recovery": summary["gap_recovery"],
        "student_acc_before": summary.get("student_acc_before"),
        "student_acc_after": summary.get("student_acc_after"),
        "teacher_acc": summary.get("teacher_acc"),
        "seconds": time.perf_counter() - started,
    }


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-lr", type=float, help="skip the sweep: LoRA's lr")
    parser.add_argument("--sweep-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--sweep-seed", type=int, default=100)
    parser.add_argument(
        "--prior", help="an earlier invocation's results file: its sweep rows are kept, not rerun"
    )
    parser.add_argument(
        "--full-gap-from",
        metavar="HEALTH_JSON",
        help="take full fine-tuning's gap recovery per seed from bench_health.py's results (the "
        "demo's pair, the same recipe) instead of running it; one 1-step full run still "
        "measures its trainable fraction and checkpoint size",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("OPD_FAST_THREADS", "2")
    folder = tempfile.mkdtemp(prefix="opd-lora-")
    common = {"progress": False, "checkpoint_every": 0, "eval_every": 0}
    adapters = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha}
    result: dict = {
        "recipe": "toy_demo",
        "lora": {**adapters, "lora_target_modules": "all-linear", "lora_dropout": 0.0},
        "full_lr": recipe("toy_demo").lr,
        "load_average_start": os.getloadavg(),
        "sweep": [],
        "full": [],
        "lora_runs": [],
    }

    def write() -> None:
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(result, handle, indent=1)

    if args.prior:
        with open(args.prior) as handle:
            result["sweep"] = json.load(handle).get("sweep", [])
        result["prior"] = args.prior
    lora_lr = args.lora_lr
    if lora_lr is None:
        swept = {row["lr"] for row in result["sweep"]}
        for lr in [lr for lr in args.sweep_lrs if lr not in swept]:
            row = one_run({**common, **adapters, "lr": lr, "seed": args.sweep_seed,
                           "run_dir": f"{folder}/sweep-{lr:g}"})  # fmt: skip
            result["sweep"].append(row)
            print(json.dumps({"sweep": row}), flush=True)
            write()
        lora_lr = max(result["sweep"], key=lambda r: r["gap_recovery"])["lr"]
    result["lora_lr"] = lora_lr
    result["lora_lr_chosen_by"] = (
        f"sweep on seed {args.sweep_seed} over {sorted(r['lr'] for r in result['sweep'])}"
        if args.lora_lr is None
        else "--lora-lr"
    )
    reference = {}
    if args.full_gap_from:
        with open(args.full_gap_from) as handle:
            reference = {
                row["seed"]: row["gap_recovery"]
                for row in json.load(handle)
                if row.get("pair") == "teacher"
            }
        sized = one_run({**common, "seed": args.seeds[0], "steps": 1, "eval_max_prompts": 8,
                         "run_dir": f"{folder}/full-size"})  # fmt: skip
        result["full_size_run"] = sized
        result["full_gap_from"] = args.full_gap_from
        print(json.dumps({"full_size_run": sized}), flush=True)
        write()
    for seed in args.seeds:
        if args.full_gap_from:
            sized = result["full_size_run"]
            full = {"seed": seed, "gap_recovery": reference[seed], "from": args.full_gap_from,
                    **{key: sized[key] for key in ("lr", "trainable_fraction",
                       "trainable_parameters", "total_parameters", "checkpoint_bytes",
                       "checkpoint_weight_bytes")}}  # fmt: skip
        else:
            full = one_run({**common, "seed": seed, "run_dir": f"{folder}/full-{seed}"})
        result["full"].append(full)
        print(json.dumps({"full": full}), flush=True)
        write()
        low = one_run({**common, **adapters, "lr": lora_lr, "seed": seed,
                       "run_dir": f"{folder}/lora-{seed}"})  # fmt: skip
        result["lora_runs"].append(low)
        print(json.dumps({"lora": low}), flush=True)
        write()
    full_gap = [r["gap_recovery"] for r in result["full"]]
    lora_gap = [r["gap_recovery"] for r in result["lora_runs"]]
    result["summary"] = {
        "full_gap_recovery": spread(full_gap),
        "lora_gap_recovery": spread(lora_gap),
        "lora_over_full_gap_recovery": statistics.fmean(lora_gap) / statistics.fmean(full_gap),
        "lora_trainable_fraction": result["lora_runs"][0]["trainable_fraction"],
        "full_checkpoint_bytes": spread([r["checkpoint_bytes"] for r in result["full"]]),
        "lora_checkpoint_bytes": spread([r["checkpoint_bytes"] for r in result["lora_runs"]]),
        "lora_over_full_checkpoint_bytes": statistics.fmean(
            r["checkpoint_bytes"] for r in result["lora_runs"]
        ) / statistics.fmean(r["checkpoint_bytes"] for r in result["full"]),
        "lora_over_full_weight_bytes": statistics.fmean(
            r["checkpoint_weight_bytes"] for r in result["lora_runs"]
        ) / statistics.fmean(r["checkpoint_weight_bytes"] for r in result["full"]),
    }
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result["summary"], indent=1))
    write()


if __name__ == "__main__":
    main()
