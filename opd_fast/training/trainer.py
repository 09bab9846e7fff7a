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
from opd_fast.training.config import TrainConfig, make_config
from opd_fast.training.data import Example, PromptSampler, load_examples
from opd_fast.training.grading import is_correct
from opd_fast.training.memory import PeakMemory
from opd_fast.training.metrics import (
    MetricsLog,
    PositionProfile,
    StepMetrics,
    summarise,
    write_json,
)
from opd_fast.training.pair import load_pair
from opd_fast.training.plots import plot_dynamics
from opd_fast.training.rollout import RolloutBatch, sample
from opd_fast.training.scoring import LossSettings, choose_loss_path, score_batch


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
        seed_everything(config.seed)
        spec = TeacherSpec.from_config(config)
        self.paths = resolve_toy(
            {
                "student": config.student,
                "teacher": None if teacher is not None else spec.path,
                "train_data": config.train_data,
                "eval_data": config.eval_data,
            },
            progress=config.progress,
        )
        pair = load_pair(
            self.paths["student"],
            replace(spec, path=self.paths["teacher"]),
            Placement.resolve(config.device, config.dtype, config.attn_implementation),
            student_trainable=True,
            variant=config.variant,
            k=config.k,
            built_teacher=teacher,
        )
        self.pair, self.device = pair, pair.placement.device
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
        if self.loss_path != config.loss_path:
            print(why, flush=True)
        self.memory = PeakMemory(self.device)

        self.train_examples = load_examples(self.paths["train_data"])
        self.eval_examples = load_examples(self.paths["eval_data"])
        if config.eval_max_prompts:
            self.eval_examples = self.eval_examples[: config.eval_max_prompts]
        self.sampler = PromptSampler(self.train_examples, config.seed)
        self.optimizer = torch.optim.AdamW(
            self.student.parameters(),
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        os.makedirs(config.run_dir, exist_ok=True)
        self.log = MetricsLog(os.path.join(config.run_dir, "metrics.jsonl"))
        self.step = 0
        self.wall_before = 0.0  # wall time of earlier (resumed-from) sessions

    # ---- evaluation -------------------------------------------------------------------

    def sample(self, model, examples: list[Example], repeats: int, temperature, top_p):
        """`repeats` responses of `model` to each example, as the config samples them."""
        config = self.config
        return sample(
            model,
            self.tokenizer,
            examples,
            repeats=repeats,
            template=config.prompt_template,
            eos_ids=self.eos_ids,
            max_new_tokens=config.max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            batch_size=config.rollout_batch_size,
            vocab_limit=self.vocab,
        )

    def accuracy(self, model, examples: list[Example]) -> float:
        """avg@n accuracy at the evaluation temperature / top-p."""
        config = self.config
        batch, repeated = self.sample(
            model, examples, config.eval_samples, config.eval_temperature, config.eval_top_p
        )
        correct = [is_correct(r, e.answer) for r, e in zip(batch.responses, repeated)]
        return sum(correct) / len(correct)

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
        examples = self.sampler.next_batch(config.prompts_per_step)
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
            loss_path=self.loss_path,
        )
        timers["teacher"] += scored.teacher_seconds
        output = scored.output
        if config.reduction == "token_mean":
            scaled = output.loss / max(total_tokens, 1)
        else:
            scaled = output.loss * (batch.input_ids.shape[0] / total_sequences)
        return scaled, output

    def train_step(self) -> dict:
        config = self.config
        timers = {"rollout": 0.0, "teacher": 0.0, "train": 0.0}
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
        total_tokens = int(batch.response_mask[:, 1:].sum())
        sequences = batch.input_ids.shape[0]
        step_metrics = StepMetrics()
        profile = PositionProfile(span=config.max_new_tokens)
        loss_value = 0.0
        for start in range(0, sequences, config.micro_batch_size):
            micro = batch.select(start, min(start + config.micro_batch_size, sequences))
            try:
                scaled, output = self.loss_on(micro, total_tokens, sequences, timers)
            except NonFiniteLogitsError as error:
                raise TrainingDiverged(
                    f"non-finite logits at step {self.step + 1}: {error}"
                ) from None
            if not torch.isfinite(scaled):
                raise TrainingDiverged(f"loss is {float(scaled)} at step {self.step + 1}")
            scaled.backward()
            loss_value += float(scaled.detach())
            step_metrics.add(output.metrics)
            profile.add(output.token_metrics, micro.response_mask[:, 1:])
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), config.grad_clip)
        )
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm is {grad_norm} at step {self.step + 1}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        timers["train"] = time.perf_counter() - started - timers["teacher"]
        self.step += 1

        record = {"kind": "train", "step": self.step, "loss": loss_value}
        record.update(step_metrics.means())
        record["position_profile"] = profile.means()
        tokens = batch.num_response_tokens
        record.update(
            grad_norm=grad_norm,
            lr=lr,
            train_reward=sum(rewards) / len(rewards),
            mean_response_length=tokens / sequences,
            truncated_fraction=sum(batch.truncated) / sequences,
            rollout_tokens_per_s=tokens / max(timers["rollout"], 1e-9),
            teacher_tokens_per_s=tokens / max(timers["teacher"], 1e-9),
            train_tokens_per_s=tokens / max(timers["train"], 1e-9),
            step_seconds=sum(timers.values()),
            # The step's own peaks: its rollouts', and its scoring + update's (the loss path's).
            rollout_peak_memory_mib=rollout_peak_mib,
            train_peak_memory_mib=self.memory.peak_mib(),
            peak_memory_mib=self.memory.overall_mib,
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
        report = cold_start(
            self.pair,
            self.train_examples,
            config.prompt_template,
            settings,
            os.path.join(config.run_dir, "cold_start_model"),
            progress=config.progress,
        )
        self.log.write(
            {
                "kind": "cold_start",
                "step": 0,
                **{k: v for k, v in report.items() if k != "settings"},
            }
        )
        return report

    # ---- checkpoints ------------------------------------------------------------------

    def save(self, final: bool = False) -> str:
        """A checkpoint of this step; `final`: the run's end (its last evaluation is done)."""
        state = {
            "metrics_records": len(self.log.read()),
            "final": final,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "config": self.config.to_dict(),
            "wall_seconds": self.wall_before + (time.perf_counter() - self.session_started),
        }
        return ckpt.save_checkpoint(
            self.config.run_dir, self.step, self.student, self.tokenizer, state
        )

    def restore(self) -> bool:
        """Resume from the run folder's newest intact checkpoint; False when the folder has
        no history. A folder with history but no usable checkpoint is an error (CheckpointError
        naming what is wrong), never a silent start from step 0."""
        path = ckpt.find_checkpoint(self.config.run_dir)
        if path is None:
            steps = [r["step"] for r in self.log.read() if r.get("kind") == "train"]
            if steps:
                raise ckpt.CheckpointError(
                    f"{self.config.run_dir} holds {len(steps)} trained steps in metrics.jsonl "
                    "but no checkpoint to resume from; run without --resume to start over "
                    "(the run folder's history is then replaced)"
                )
            return False
        checkpoint = ckpt.load_checkpoint(path)
        ckpt.load_weights(self.student, checkpoint.model_dir)
        state = checkpoint.trainer_state
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        self.step = checkpoint.step
        self.wall_before = float(state.get("wall_seconds", 0.0))
        self.log.truncate(state.get("metrics_records"), self.step)
        self.finished = bool(state.get("final", False))
        return True

    # ---- the run ----------------------------------------------------------------------

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
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
            if os.path.exists(self.log.path):
                os.remove(self.log.path)  # a fresh run starts a fresh log
            write_json(os.path.join(config.run_dir, "config.json"), config.to_dict())
            self.evaluate(with_teacher=True)
            if config.cold_start_steps:
                self.cold_start()
                self.evaluate()  # step 0 again: the student OPD starts from
        progress = _progress(config, initial=self.step)
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
                    interrupted = stop.requested
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
        records = self.log.read()
        summary = summarise(records, wall)
        write_json(os.path.join(config.run_dir, "summary.json"), summary)
        plot_dynamics(records, os.path.join(config.run_dir, "dynamics.png"))
        return summary


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
    return Trainer(config, teacher=teacher).run(resume=resume)
