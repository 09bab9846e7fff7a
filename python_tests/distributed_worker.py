"""One rank of the multi-rank tests (test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_worker.py \
        MODE CONFIG_JSON [options]

step: one train_step on the global batch saved in --batch (this rank takes its share), then rank
      0 saves the full (unsharded) parameters and the step's record to --out.
generate: one rollout phase (the step's rollouts); rank 0 saves to --out the number of
      all-gathers it ran, the decoding steps and the FSDP2 units.
teacher: the in-process teacher's answers (hidden states with the output layer, and logits)
      for the batch in --batch, every rank scoring all of it; rank 0 saves them to --out with
      the share of the teacher's parameters this rank holds.
run:  Trainer(config).run(resume=--resume, stop_after=--stop-after); with --fail-rank R, rank R
      raises in its step --fail-step; with --logits, rank 0 saves the trained (sharded) student's
      logits on fixed token ids to that file.
"""

from __future__ import annotations

import argparse
import json

import torch

from opd_fast.training.config import make_config
from opd_fast.training.trainer import Trainer

LOGIT_IDS = [[1, 5, 9, 13, 17, 21, 25, 29]]


def full_parameters(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        name: tensor.clone()
        for name, tensor in get_model_state_dict(model, options=options).items()
    }


def engine_vs_student(trainer) -> list[float] | None:
    """Per rank: the largest |log p| difference between the rollout engine's prompt log-probs
    and the (sharded) student's own forward on fixed ids, after the last weight sync."""
    engine = trainer.parts.engine
    if not hasattr(engine, "prompt_log_probs"):
        return None
    import torch.distributed as torch_dist

    ids = torch.tensor(LOGIT_IDS)
    with torch.no_grad():
        logits = trainer.parts.student(input_ids=ids).logits[0, :-1].float()
    student = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    served = torch.tensor(engine.prompt_log_probs(LOGIT_IDS)[0])
    gaps = [None] * trainer.parts.dist.world_size
    torch_dist.all_gather_object(gaps, float((served - student).abs().max()))
    return gaps


def local_numel(parameter) -> int:
    """Elements this rank holds of a (possibly FSDP-sharded, DTensor) parameter."""
    local = getattr(parameter, "to_local", None)
    return (local() if local is not None else parameter).numel()


def share_of(batch, examples, rank: int, world: int):
    per = batch.input_ids.shape[0] // world
    return batch.select(rank * per, (rank + 1) * per), examples[rank * per : (rank + 1) * per]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["step", "run", "teacher", "generate"])
    parser.add_argument("config")
    parser.add_argument("--batch")
    parser.add_argument("--out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--fail-step", type=int, default=1)
    parser.add_argument("--logits")
    args = parser.parse_args()
    with open(args.config) as handle:
        trainer = Trainer(make_config(json.load(handle)))
    dist = trainer.parts.dist
    if args.mode == "step":
        batch, examples = torch.load(args.batch, weights_only=False)
        record = trainer.train_step(share_of(batch, examples, dist.rank, dist.world_size))
        engine_gap = engine_vs_student(trainer)  # None unless the engine holds its own weights
        student = trainer.parts.student
        parameters = full_parameters(student)
        gradients = {  # the step's gradients, still in .grad (a collective: every rank)
            name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
            for name, p in student.named_parameters()
            if p.requires_grad  # a LoRA student's frozen base has none
        }
        if dist.is_main:
            torch.save(
                {
                    "parameters": parameters,
                    "gradients": gradients,
                    "record": record,
                    "engine_gap": engine_gap,
                },
                args.out,
            )
        dist.close()
        return
    if args.mode == "generate":
        import torch.distributed as torch_dist

        from opd_fast.training.distributed import fsdp_units
        from opd_fast.training.step.rollout import sample_rollouts

        calls = [0]
        names = [
            n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(torch_dist, n)
        ]
        real = {name: getattr(torch_dist, name) for name in names}  # FSDP2's, by torch release

        def counting(function):
            def counted(*a, **k):
                calls[0] += 1
                return function(*a, **k)

            return counted

        for name in names:
            setattr(torch_dist, name, counting(real[name]))
        batch, _ = sample_rollouts(trainer.parts)
        for name in names:
            setattr(torch_dist, name, real[name])
        steps = int(batch.response_mask.sum(dim=1).max())
        units = len(fsdp_units(trainer.parts.student))
        if dist.is_main:
            torch.save({"all_gathers": calls[0], "decoding_steps": steps, "units": units}, args.out)
        dist.close()
        return
    if args.mode == "teacher":
        batch, _ = torch.load(args.batch, weights_only=False)
        local = trainer.parts.teacher
        hidden = local.linear_teacher(
            batch.input_ids, batch.attention_mask, batch.position_ids, torch.float32
        )
        logits = local.logits(batch.input_ids, batch.attention_mask, batch.position_ids)
        held = sum(local_numel(p) for p in local.model.parameters())
        total = sum(p.numel() for p in local.model.parameters())
        if dist.is_main:
            torch.save(
                {"hidden": hidden, "logits": logits, "held_fraction": held / total}, args.out
            )
        dist.close()
        return
    if args.fail_rank is not None:
        original = trainer.train_step

        def failing_step(rollouts=None):
            if dist.rank == args.fail_rank and trainer.step + 1 == args.fail_step:
                raise RuntimeError(f"injected failure on rank {dist.rank}")
            return original(rollouts)

        trainer.train_step = failing_step
    trainer.run(resume=args.resume, stop_after=args.stop_after)
    if args.logits:
        with torch.no_grad():
            logits = trainer.parts.student(input_ids=torch.tensor(LOGIT_IDS)).logits
        if dist.is_main:
            torch.save(logits, args.logits)
    dist.close()


if __name__ == "__main__":
    main()
