"""The OPD training loop: opd_fast.train(config).

One step: draw prompts, sample rollouts with the student (`rollout`), score every response
position with the frozen teacher and compute the top-k reverse-KL loss and its metrics with
the fused op over micro-batches (`scoring`, gradient accumulation), clip and update. Writes
metrics.jsonl, summary.json, dynamics.png and checkpoints to the run folder.
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import torch

from opd_fast.models.loading import Placement
from opd_fast.op.loss import NonFiniteLogitsError, opd_loss
from opd_fast.teachers.base import Teacher
from opd_fast.teachers.factory import TeacherSpec
from opd_fast.toy import resolve_toy
from opd_fast.training import checkpoint as ckpt
from opd_fast.training import sharded_checkpoint
from opd_fast.training.config import TrainConfig, make_config
from opd_fast.training.data import (
    Example,
    PromptSampler,
    check_prompt_lengths,
    load_examples,
)
from opd_fast.training.distributed import Distributed, clip_grad_norm, teacher_url_for_rank
from opd_fast.training.engines import RolloutEngine, SamplingSettings, make_engine
from opd_fast.training.engines.base import sample_examples
from opd_fast.training.grading import is_correct
from opd_fast.training.loggers import open_run_log
from opd_fast.training.memory import PeakMemory
from opd_fast.training.metrics import (
    PositionProfile,
    StepMetrics,
    summarise,
    write_json,
)
from opd_fast.training.off_policy import OffPolicyGap
from opd_fast.training.pair import load_pair
from opd_fast.training.plots import plot_dynamics
from opd_fast.training.rollout import RolloutBatch
from opd_fast.training.scoring import LossSettings, choose_loss_path, score_batch
from opd_fast.training.threads import cpu_threads


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        if config.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(self, config: TrainConfig, teacher: Teacher | None = None, loss_fn=opd_loss):
        """teacher: use this Teacher instead of loading config.teacher; loss_fn: a function
        with opd_fast.opd_loss's signature (tests swap in the reference)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-shard load/save bars drown the step bar
        self.config = config
        self.loss_fn = loss_fn
        # Under torchrun: a process group, this rank's device; else a no-op single process.
        self.dist = dist = Distributed.from_env(config.device)
        dist.split(range(config.prompts_per_step))  # refuse an uneven split before loading
        if dist.active and config.cold_start_steps:
            raise ValueError("config: cold_start_steps is not supported in a multi-rank run yet")
        if dist.active and config.rollout_engine != "hf":  # the weight sync gathers no shards
            raise ValueError(
                f"config: rollout_engine {config.rollout_engine} is not supported in a "
                "multi-rank run yet; use rollout_engine: hf"
            )
        seed_everything(config.seed + dist.rank)  # each rank samples its own rollouts
        spec = TeacherSpec.from_config(config)
        spec = replace(spec, url=teacher_url_for_rank(spec.url, dist.rank))
        self.paths = dist.main_first(  # rank 0 builds the toy world's cache, then the others
            lambda: resolve_toy(
                {
                    "student": config.student,
                    "teacher": None if teacher is not None else spec.path,
                    "train_data": config.train_data,
                    "eval_data": config.eval_data,
                },
                progress=config.progress and dist.is_main,
            )
        )
        placement = Placement.resolve(
            dist.device_name(config.device), config.dtype, config.attn_implementation
        )
        # Data first: a bad row is reported before minutes of model loading.
        self.train_examples = load_examples(self.paths["train_data"])
        self.eval_examples = load_examples(self.paths["eval_data"])
        if config.eval_max_prompts:
            self.eval_examples = self.eval_examples[: config.eval_max_prompts]
        pair = load_pair(
            self.paths["student"],
            replace(spec, path=self.paths["teacher"]),
            placement,
            student_trainable=True,
            variant=config.variant,
            k=config.k,
            built_teacher=teacher,
        )
        self.pair, self.device = pair, pair.placement.device
        pair.student = dist.shard(pair.student, placement.dtype, config.fsdp_cpu_offload)
        self.tokenizer, self.student, self.teacher = pair.tokenizer, pair.student, pair.teacher
        self.vocab, self.eos_ids = pair.vocab, pair.eos_ids
        self.loss_settings = LossSettings(
            k=config.k,
            variant=config.variant,
            estimator=config.estimator,
            temperature=config.loss_temperature,
            vocab=self.vocab,
        )
        self.loss_path, why = choose_loss_path(
            config.loss_path, self.student, self.teacher, loss_fn
        )
        if dist.active and self.loss_path == "fused_linear":  # FSDP2 gathers in forward()
            self.loss_path = "logits"
            why = "loss_path=fused_linear is not supported in a multi-rank run yet: using logits"
        if self.loss_path != config.loss_path:
            print(why, flush=True)
        self.memory = PeakMemory(self.device)

        positions = getattr(self.student.config, "max_position_embeddings", None)
        self.longest_prompt = max(
            check_prompt_lengths(
                examples, config.prompt_template, self.tokenizer, config.max_new_tokens, positions
            )
            for examples in (self.train_examples, self.eval_examples)
        )
        self.sampler = PromptSampler(self.train_examples, config.seed)
        # The student's sampler: rollouts and evaluation (vllm: refused here, before any step,
        # when it is not installed or cannot run the student's architecture).
        self.engine = self.engine_for(self.student, self.paths["student"])
        self.gap = OffPolicyGap()  # this step's engine-vs-trainer log-prob gap
        self.optimizer = torch.optim.AdamW(
            self.student.parameters(),
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        os.makedirs(config.run_dir, exist_ok=True)
        self.log = open_run_log(config.run_dir, config.loggers, config.to_dict(), dist.is_main)
        self.step = 0
        self.wall_before = 0.0  # wall time of earlier (resumed-from) sessions

    # ---- evaluation -------------------------------------------------------------------

    def engine_for(self, model, model_path: str) -> RolloutEngine:
        """A config.rollout_engine engine sampling `model` (loaded from `model_path`)."""
        config = self.config
        return make_engine(
            config.rollout_engine,
            model,
            self.tokenizer,
            model_path=model_path,
            batch_size=config.rollout_batch_size,
            seed=config.seed,
            max_model_len=self.longest_prompt + config.max_new_tokens,
            max_num_seqs=config.rollout_batch_size,
        )

    def sample(self, model, examples: list[Example], repeats: int, temperature, top_p):
        """`repeats` responses of `model` to each example, as the config samples them: the
        student's through its rollout engine, another model's (the teacher's, evaluated once
        as a reference) with Hugging Face generate."""
        config = self.config
        if model is self.student:
            engine = self.engine
        else:
            engine = make_engine("hf", model, self.tokenizer, batch_size=config.rollout_batch_size)
        settings = SamplingSettings(
            eos_ids=tuple(self.eos_ids),
            max_new_tokens=config.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            vocab_limit=self.vocab,
        )
        engine.wake()
        try:
            return sample_examples(
                engine,
                self.tokenizer,
                examples,
                repeats=repeats,
                template=config.prompt_template,
                settings=settings,
            )
        finally:
            engine.sleep()  # the trainer's turn: the engine's memory back where vLLM allows

    def accuracy(self, model, examples: list[Example]) -> float:
        """avg@n accuracy at the evaluation temperature / top-p (split over ranks)."""
        config = self.config
        share, real = self.dist.padded_share(examples)
        batch, repeated = self.sample(
            model, share, config.eval_samples, config.eval_temperature, config.eval_top_p
        )
        correct = [is_correct(r, e.answer) for r, e in zip(batch.responses, repeated)]
        real *= config.eval_samples
        correct, count = self.dist.sum([sum(correct[:real]), real])
        return correct / count

    def evaluate(self, with_teacher: bool = False) -> dict:
        record = {"kind": "eval", "step": self.step}
        record["student_accuracy"] = self.accuracy(self.student, self.eval_examples)
        if with_teacher and self.teacher.local_model is not None:
            # Sampling the teacher's answers must not move the random stream that the
            # student's rollouts draw from: a run with a remote teacher (which cannot be
            # evaluated here) then sees the same rollouts as one with the teacher in process.
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                teacher = self.teacher.local_model
                record["teacher_accuracy"] = self.accuracy(teacher, self.eval_examples)
        self.log.write(record)
        return record

    # ---- one training step ------------------------------------------------------------

    def rollouts(self) -> tuple[RolloutBatch, list[Example]]:
        config = self.config
        # Every rank draws the whole step (the sampler stays the same everywhere), keeps its share.
        examples = self.dist.split(self.sampler.next_batch(config.prompts_per_step))
        return self.sample(
            self.student,
            examples,
            config.rollouts_per_prompt,
            config.rollout_temperature,
            config.rollout_top_p,
        )

    def loss_on(self, batch: RolloutBatch, total_tokens: int, total_sequences: int, timers):
        """Loss of one micro-batch, scaled so that summing over micro-batches gives the step's
        token_mean (or seq_mean_token_sum); returns (scaled loss, the opd_loss output)."""
        config = self.config
        scored = score_batch(
            self.student,
            self.teacher,
            batch,
            self.loss_settings,
            reduction="sum" if config.reduction == "token_mean" else "seq_mean_token_sum",
            loss_fn=self.loss_fn,
            rollout_temperature=config.rollout_temperature,
            is_cap=config.rollout_is_cap or None,
            loss_path=self.loss_path,
        )
        timers["teacher"] += scored.teacher_seconds
        if scored.train_log_probs is not None:
            self.gap.add(
                scored.train_log_probs,
                batch.engine_log_probs[:, 1:],
                scored.response_mask,
                scored.is_weights,
                config.rollout_is_cap or None,
            )
        output = scored.output
        if config.reduction == "token_mean":
            scaled = output.loss / max(total_tokens, 1)
        else:
            scaled = output.loss * (batch.input_ids.shape[0] / total_sequences)
        return scaled, output

    def train_step(self) -> dict:
        config = self.config
        timers = {"rollout": 0.0, "teacher": 0.0, "train": 0.0, "sync": 0.0}
        started = time.perf_counter()
        self.memory.start()
        batch, examples = self.rollouts()
        timers["rollout"] = time.perf_counter() - started
        rollout_peak_mib = self.memory.peak_mib()
        self.memory.start()
        rewards = [is_correct(r, e.answer) for r, e in zip(batch.responses, examples)]

        started = time.perf_counter()
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        sequences = batch.input_ids.shape[0]
        # The loss is normalised by the global batch's tokens (sequences): all ranks together
        # make the single-process update.
        total_tokens, total_sequences = self.dist.sum(
            [int(batch.response_mask[:, 1:].sum()), sequences]
        )
        step_metrics = StepMetrics()
        self.gap = OffPolicyGap()
        profile = PositionProfile(span=config.max_new_tokens)
        loss_value = 0.0
        for start in range(0, sequences, config.micro_batch_size):
            micro = batch.select(start, min(start + config.micro_batch_size, sequences))
            try:
                scaled, output = self.loss_on(micro, total_tokens, total_sequences, timers)
            except NonFiniteLogitsError as error:
                raise TrainingDiverged(
                    f"non-finite logits at step {self.step + 1}: {error}"
                ) from None
            if not torch.isfinite(scaled):
                raise TrainingDiverged(f"loss is {float(scaled)} at step {self.step + 1}")
            self.dist.backward(scaled)
            loss_value += float(scaled.detach())
            step_metrics.add(output.metrics)
            profile.add(output.token_metrics, micro.response_mask[:, 1:])
        grad_norm = clip_grad_norm(self.student.parameters(), config.grad_clip)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm is {grad_norm} at step {self.step + 1}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        timers["train"] = time.perf_counter() - started - timers["teacher"]
        started = time.perf_counter()
        self.engine.sync_weights(self.student)  # the next rollouts sample the new weights
        timers["sync"] = time.perf_counter() - started
        self.step += 1

        # Over ranks: sums of tokens and token-weighted metric sums, the slowest rank's times.
        self.dist.reduce_step_metrics(step_metrics, profile)
        loss_value, rewards, tokens, truncated = self.dist.sum(
            [loss_value, sum(rewards), batch.num_response_tokens, sum(batch.truncated)]
        )
        timers = self.dist.max(timers)
        record = {"kind": "train", "step": self.step, "loss": loss_value}
        record.update(step_metrics.means())
        record.update(self.gap.means())
        record["position_profile"] = profile.means()
        record.update(
            grad_norm=grad_norm,
            lr=lr,
            train_reward=rewards / total_sequences,
            mean_response_length=tokens / total_sequences,
            truncated_fraction=truncated / total_sequences,
            rollout_tokens_per_s=tokens / max(timers["rollout"], 1e-9),
            teacher_tokens_per_s=tokens / max(timers["teacher"], 1e-9),
            train_tokens_per_s=tokens / max(timers["train"], 1e-9),
            weight_sync_seconds=timers["sync"],
            step_seconds=sum(timers.values()),
            # The step's own peaks: its rollouts', and its scoring + update's (the loss path's);
            # over ranks, the largest.
            **self.dist.max(
                {
                    "rollout_peak_memory_mib": rollout_peak_mib,
                    "train_peak_memory_mib": self.memory.peak_mib(),
                    "peak_memory_mib": self.memory.overall_mib,
                }
            ),
            loss_path=self.loss_path,
        )
        self.log.write(record)
        return record

    def cold_start(self) -> dict:
        """SFT the student on filtered teacher responses to the training prompts (in place)."""
        from opd_fast.training.cold_start import SFTSettings, cold_start

        config = self.config
        settings = SFTSettings(
            responses_per_prompt=config.cold_start_responses_per_prompt,
            max_new_tokens=config.max_new_tokens,
            temperature=config.rollout_temperature,
            only_correct=config.cold_start_only_correct,
            steps=config.cold_start_steps,
            batch_size=config.cold_start_batch_size,
            lr=config.cold_start_lr,
            seed=config.seed,
        )
        teacher_engine = None
        if self.teacher.local_model is not None:
            teacher_engine = self.engine_for(self.teacher.local_model, self.paths["teacher"])
        try:
            report = cold_start(
                self.pair,
                self.train_examples,
                config.prompt_template,
                settings,
                os.path.join(config.run_dir, "cold_start_model"),
                progress=config.progress,
                engine=teacher_engine,
            )
        finally:
            if teacher_engine is not None:
                teacher_engine.close()
        self.engine.sync_weights(self.student)  # OPD starts from the fine-tuned student
        self.log.write(
            {
                "kind": "cold_start",
                "step": 0,
                **{k: v for k, v in report.items() if k != "settings"},
            }
        )
        return report

    def close(self) -> None:
        """Free the rollout engine (a vLLM engine's memory and state)."""
        self.engine.close()

    # ---- checkpoints ------------------------------------------------------------------

    def save(self, final: bool = False) -> str:
        """A checkpoint of this step; `final`: the run's end (its last evaluation is done)."""
        state = {
            "metrics_records": len(self.log.read()),
            "final": final,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "config": self.config.to_dict(),
            "wall_seconds": self.wall_before + (time.perf_counter() - self.session_started),
        }
        if self.dist.active:  # sharded student and optimizer, each rank's RNG
            return sharded_checkpoint.save(
                self.dist,
                self.config.run_dir,
                self.step,
                self.student,
                self.optimizer,
                self.tokenizer,
                state,
                {"rng": ckpt.rng_state()},
                consolidate=final,
            )
        state.update(optimizer=self.optimizer.state_dict(), rng=ckpt.rng_state())
        return ckpt.save_checkpoint(
            self.config.run_dir, self.step, self.student, self.tokenizer, state
        )

    def restore(self) -> bool:
        """Resume from the run folder's newest intact checkpoint; False when the folder has
        no history. A folder with history but no usable checkpoint is an error (CheckpointError
        naming what is wrong), never a silent start from step 0."""
        path = self.dist.on_main(self._find_checkpoint)  # rank 0 scans (and repairs)
        if path is None:
            return False
        checkpoint = ckpt.load_checkpoint(path)
        state = checkpoint.trainer_state
        if self.dist.active:
            world_size = state.get("world_size")
            rank_state = sharded_checkpoint.load(
                self.dist, path, self.student, self.optimizer, world_size
            )
            state = {**state, **rank_state}
        else:
            if sharded_checkpoint.is_sharded_checkpoint(path):
                raise ckpt.CheckpointError(
                    f"{path} was written by a multi-rank run; resume it under torchrun with "
                    f"{state.get('world_size')} ranks (or export it: opd-fast export)"
                )
            ckpt.load_weights(self.student, checkpoint.model_dir)
            self.optimizer.load_state_dict(state["optimizer"])
        self.engine.sync_weights(self.student)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        self.step = checkpoint.step
        self.wall_before = float(state.get("wall_seconds", 0.0))
        self.log.truncate(state.get("metrics_records"), self.step)
        self.finished = bool(state.get("final", False))
        return True

    def _find_checkpoint(self) -> str | None:
        path = ckpt.find_checkpoint(self.config.run_dir)
        if path is None:
            steps = [r["step"] for r in self.log.read() if r.get("kind") == "train"]
            if steps:
                raise ckpt.CheckpointError(
                    f"{self.config.run_dir} holds {len(steps)} trained steps in metrics.jsonl "
                    "but no checkpoint to resume from; run without --resume to start over "
                    "(the run folder's history is then replaced)"
                )
        return path

    # ---- the run ----------------------------------------------------------------------

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train to config.steps (from the latest checkpoint when resuming), on CPU with the
        cores other processes leave free (training/threads.py). See _run_steps."""
        with cpu_threads(self.device):
            return self._run_steps(resume, stop_after)

    def _run_steps(self, resume: bool, stop_after: int | None) -> dict:
        """Train to config.steps (from the latest checkpoint when resuming).

        Ctrl-C finishes the current step, saves a checkpoint and raises KeyboardInterrupt; a
        second Ctrl-C aborts at once. stop_after: leave after that many steps of this session
        the same way (saved, resumable), without raising.
        """
        config = self.config
        self.session_started = time.perf_counter()
        self.finished = False
        resumed = self.restore() if resume else False
        if not resumed:
            if self.dist.is_main:  # rank 0 alone writes the run folder
                if os.path.exists(self.log.path):
                    os.remove(self.log.path)  # a fresh run starts a fresh log
                write_json(os.path.join(config.run_dir, "config.json"), config.to_dict())
            self.evaluate(with_teacher=True)
            if config.cold_start_steps:
                self.cold_start()
                self.evaluate()  # step 0 again: the student OPD starts from
        progress = _progress(config, initial=self.step) if self.dist.is_main else None
        session_steps = 0
        with _StopRequest() as stop:
            try:
                while self.step < config.steps:
                    record = self.train_step()
                    session_steps += 1
                    if (
                        config.eval_every
                        and self.step % config.eval_every == 0
                        and self.step < config.steps
                    ):
                        record["student_accuracy"] = self.evaluate()["student_accuracy"]
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self.save()
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(
                            loss=f"{record['loss']:.4f}", overlap=f"{record['overlap_ratio']:.3f}"
                        )
                    interrupted = self.dist.any(stop.requested)
                    if interrupted or (stop_after is not None and session_steps >= stop_after):
                        if self.step < config.steps:
                            path = self.save()
                            print(f"\nstopped at step {self.step}; checkpoint: {path}", flush=True)
                            if interrupted:
                                raise KeyboardInterrupt
                            return {"stopped_at_step": self.step, "checkpoint": path}
            except TrainingDiverged as error:
                kept = ckpt.latest_checkpoint(config.run_dir)
                raise TrainingDiverged(
                    f"{error}; stopped. Last good checkpoint: {kept or 'none written yet'}"
                ) from None
            finally:
                if progress is not None:
                    progress.close()
        # Resumed from the end's own checkpoint, nothing trained since: evaluated and saved.
        if session_steps or not self.finished:
            self.evaluate()
            self.save(final=True)
        wall = self.wall_before + (time.perf_counter() - self.session_started)

        def finish() -> dict:
            records = self.log.read()
            summary = summarise(records, wall)
            write_json(os.path.join(config.run_dir, "summary.json"), summary)
            plot_dynamics(records, os.path.join(config.run_dir, "dynamics.png"))
            self.log.close()
            return summary

        return self.dist.on_main(finish)  # rank 0 writes; every rank returns its summary


class _StopRequest:
    """While active, the first SIGINT only sets `requested` (the loop saves and stops at the
    end of the step); a second SIGINT raises KeyboardInterrupt at once."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)",
            flush=True,
        )

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _progress(config: TrainConfig, initial: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=initial, desc="OPD", unit="step")


def train(
    config: TrainConfig | dict | None = None,
    *,
    resume: bool = False,
    teacher: Teacher | None = None,
) -> dict:
    """Run OPD training; returns the summary (also written to <run_dir>/summary.json).

    config: a TrainConfig or a dict of its keys (unknown keys raise, listing the valid ones).
    resume: continue from the run folder's latest checkpoint.
    teacher: score with this Teacher instead of building the one the config names.
    """
    if not isinstance(config, TrainConfig):
        config = make_config(config or {})
    else:
        config.validate()
    trainer = Trainer(config, teacher=teacher)
    try:
        return trainer.run(resume=resume)
    finally:
        trainer.close()
