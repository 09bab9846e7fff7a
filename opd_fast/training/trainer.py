"""The OPD training run: opd_fast.train(config).

`Trainer` is the run's loop: it builds the run from its config (opd_fast.training.builder),
evaluates before and after, optionally cold-starts the student, trains step after step (each
step the five stages of opd_fast.training.step), evaluates and checkpoints on the config's
cadence, and resumes exactly. It writes metrics.jsonl, summary.json, dynamics.png and
checkpoints to the run folder.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import torch

from opd_fast.op.loss import opd_loss
from opd_fast.teachers.base import Teacher
from opd_fast.training import health
from opd_fast.training.builder import Run, build_run
from opd_fast.training.checkpoints import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    read_metrics_copy,
    set_rng_state,
    tidy,
)
from opd_fast.training.config import TrainConfig, make_config
from opd_fast.training.data import Example
from opd_fast.training.evaluation import evaluate
from opd_fast.training.metrics import summarise, write_json
from opd_fast.training.plots import plot_dynamics
from opd_fast.training.rollouts import RolloutBatch
from opd_fast.training.step import TrainingDiverged, train_step
from opd_fast.training.step.rollout import InFlight, RolloutsAhead, rollout_seed
from opd_fast.training.threads import cpu_threads

__all__ = ["Trainer", "TrainingDiverged", "train"]


class Trainer:
    def __init__(self, config: TrainConfig, teacher: Teacher | None = None, loss_fn=opd_loss):
        """teacher: use this Teacher instead of loading config.teacher; loss_fn: a function
        with opd_fast.opd_loss's signature (tests swap in the reference)."""
        self.config = config
        self.parts: Run = build_run(config, teacher=teacher, loss_fn=loss_fn)
        self.step = 0  # steps trained so far
        self.wall_before = 0.0  # wall time of earlier (resumed-from) sessions
        self.session_started = time.perf_counter()
        self.finished = False  # the run's end checkpoint is written (a resumed finished run)
        self.ahead: RolloutsAhead | None = None  # max_staleness > 0: rollouts beside training
        self._resumed_in_flight: list[InFlight] = []

    # ---- steps, evaluation, the cold start ----------------------------------------------

    def train_step(self, rollouts: tuple[RolloutBatch, list[Example]] | None = None) -> dict:
        """Train the next step (on `rollouts` when given: this rank's batch and examples;
        else the step's rollouts, sampled now or ahead of it)."""
        step = self.step + 1
        if rollouts is None and self.ahead is not None:
            item = self.ahead.take(step)
            record = train_step(
                self.parts,
                step,
                (item.batch, item.examples),
                staleness=step - 1 - item.version,
                sync=lambda: self.ahead.weights_updated(step),
            )
        else:
            record = train_step(self.parts, step, rollouts)
        self.step = step
        return record

    def evaluate(self, with_teacher: bool = False) -> dict:
        if self.ahead is None:
            return evaluate(self.parts, self.step, with_teacher)
        # Between two samplings ahead, and seeded by the step: the same draws however the
        # threads interleave.
        with self.ahead.engine_turn():
            torch.manual_seed(rollout_seed(self.config.seed, self.parts.dist.rank, -1 - self.step))
            return evaluate(self.parts, self.step, with_teacher)

    def _start_sampling_ahead(self) -> None:
        if self.config.max_staleness and self.ahead is None:
            self.ahead = RolloutsAhead(
                self.parts, self.config.max_staleness, self.step, self._resumed_in_flight
            )
            self._resumed_in_flight = []

    def cold_start(self) -> dict:
        """SFT the student on filtered teacher responses to the training prompts (in place)."""
        from opd_fast.training.cold_start import cold_start_run

        return cold_start_run(self.parts)

    def close(self) -> None:
        """Stop the sampling ahead, free the rollout engine (a vLLM engine's memory)."""
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None
        self.parts.engine.close()

    def _check_health(self) -> dict | None:
        """Every health_window steps: the health record of the last window (written to the
        log, and warned about when failing), the same on every rank."""
        window = self.config.health_window
        if not window or self.step % window:
            return None

        def on_main() -> dict | None:
            train = [r for r in self.parts.log.read() if r.get("kind") == "train"]
            record = health.check(train, self.step, window)
            if record is not None:
                self.parts.log.write(record)
                if record["verdict"] == "failing":
                    print("\n" + health.warning(record), flush=True)
            return record

        return self.parts.dist.on_main(on_main)

    def _probe(self) -> None:
        """probe_before_train: the probe's verdict on the student's rollouts of up to 8
        evaluation prompts (with several teachers: of each one's), before step 1; the random
        streams are left as they were."""
        from opd_fast.training.step.rollout import sample
        from opd_fast.training.step.score import score_batch

        parts = self.parts
        groups = {None: parts.eval_examples}
        if parts.routes is not None:
            groups = parts.routes.split(parts.eval_examples)
        devices = [parts.device] if parts.device.type == "cuda" else []
        for name, examples in groups.items():
            if not examples:
                continue
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                batch, _ = sample(parts, parts.engine, examples[:8], 1, 1.0, 1.0)
                scored = score_batch(
                    parts.student,
                    parts.teacher_of(name),
                    batch,
                    parts.loss,
                    loss_path=parts.loss_path,
                )
            metrics = {key: float(value) for key, value in scored.output.metrics.items()}
            record = {"kind": "probe", "step": self.step, **metrics}
            record["verdict"] = health.verdict(metrics["overlap_ratio"])
            if name is not None:
                record["teacher"] = name
            parts.log.write(record)
            if parts.dist.is_main:
                print(
                    f"probe before training{'' if name is None else f' ({name})'}: overlap "
                    f"ratio {metrics['overlap_ratio']:.3f}, overlap-token advantage "
                    f"{metrics['overlap_token_advantage']:.3f}, entropy gap "
                    f"{metrics['entropy_gap']:.3f}: {record['verdict']}",
                    flush=True,
                )

    # ---- checkpoints ------------------------------------------------------------------

    def save(self, final: bool = False) -> str:
        """A checkpoint of this step; `final`: the run's end (its last evaluation is done)."""
        parts = self.parts
        in_flight, sampler = [], parts.sampler.state_dict()
        if self.ahead is not None:  # the rollouts sampled ahead, and the prompts drawn for them
            in_flight, sampler = self.ahead.in_flight()
        lines = parts.log.lines()  # kept in the checkpoint: resume restores a lost log from it
        state = {
            "metrics_records": len(lines),
            "final": final,
            "scheduler": parts.scheduler.state_dict(),
            "sampler": sampler,
            "config": self.config.to_dict(),
            "wall_seconds": self.wall_before + (time.perf_counter() - self.session_started),
        }
        if in_flight:
            state["in_flight"] = [
                {
                    "step": item.step,
                    "version": item.version,
                    "batch": item.batch.state_dict(),
                    "examples": [dataclasses.asdict(example) for example in item.examples],
                }
                for item in in_flight
            ]
        return parts.checkpointer.save(
            self.step,
            parts.student,
            parts.optimizer,
            parts.tokenizer,
            state,
            final=final,
            metrics_lines=lines,
        )

    def restore(self) -> bool:
        """Resume from the run folder's newest intact checkpoint; False when the folder has
        no history. A folder with history but no usable checkpoint is an error (CheckpointError
        naming what is wrong), never a silent start from step 0."""
        parts = self.parts
        path = parts.dist.on_main(self._find_checkpoint)  # rank 0 scans (and repairs)
        if path is None:
            return False
        state = parts.checkpointer.load(path, parts.student, parts.optimizer)
        parts.engine.sync_weights(parts.student)
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.wall_before = float(state.get("wall_seconds", 0.0))
        saved = read_metrics_copy(path) if parts.dist.is_main else None
        parts.log.truncate(state.get("metrics_records"), self.step, saved)
        self.finished = bool(state.get("final", False))
        self._resumed_in_flight = [
            InFlight(
                item["step"],
                item["version"],
                RolloutBatch.from_state(item["batch"], parts.device),
                [Example(**example) for example in item["examples"]],
            )
            for item in state.get("in_flight", [])
        ]
        return True

    def _find_checkpoint(self) -> str | None:
        path = find_checkpoint(self.config.run_dir)
        if path is None:
            steps = [r["step"] for r in self.parts.log.read() if r.get("kind") == "train"]
            if steps:
                raise CheckpointError(
                    f"{self.config.run_dir} holds {len(steps)} trained steps in metrics.jsonl "
                    "but no checkpoint to resume from; run without --resume to start over "
                    "(the run folder's history is then replaced)"
                )
        return path

    # ---- the run ----------------------------------------------------------------------

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train to config.steps (from the latest checkpoint when resuming), on CPU with
        config.threads threads (training/threads.py). See _run_steps."""
        with cpu_threads(self.parts.device, self.config.threads):
            return self._run_steps(resume, stop_after)

    def _start(self, resume: bool) -> None:
        """Resume, or start a fresh run folder: the evaluation before training (with the
        teacher's as a reference) and the cold start when the config asks for one."""
        self.session_started = time.perf_counter()
        self.finished = False
        if resume and self.restore():
            self._start_sampling_ahead()
            return
        config = self.config
        if self.parts.dist.is_main:  # rank 0 alone writes the run folder
            if os.path.exists(self.parts.log.path):
                os.remove(self.parts.log.path)  # a fresh run starts a fresh log
            tidy(config.run_dir)  # what killed saves left behind
            write_json(os.path.join(config.run_dir, "config.json"), config.to_dict())
        self.evaluate(with_teacher=True)
        if config.cold_start_steps:
            self.cold_start()
            self.evaluate()  # step 0 again: the student OPD starts from
        if config.probe_before_train:
            self._probe()
        self._start_sampling_ahead()

    def _run_steps(self, resume: bool, stop_after: int | None) -> dict:
        """Train to config.steps (from the latest checkpoint when resuming).

        Ctrl-C finishes the current step, saves a checkpoint and raises KeyboardInterrupt; a
        second Ctrl-C aborts at once. stop_after: leave after that many steps of this session
        the same way (saved, resumable), without raising.
        """
        try:
            return self._train_to_the_end(resume, stop_after)
        finally:
            if self.ahead is not None:  # the sampling thread ends with the session
                self.ahead.close()
                self.ahead = None

    def _train_to_the_end(self, resume: bool, stop_after: int | None) -> dict:
        config = self.config
        self._start(resume)
        progress = _progress(config, initial=self.step) if self.parts.dist.is_main else None
        session_steps = 0
        with _StopRequest() as stop:
            try:
                while self.step < config.steps:
                    record = self.train_step()
                    session_steps += 1
                    health = self._check_health()
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
                    interrupted = self.parts.dist.any(stop.requested)
                    unhealthy = (
                        config.health_stop
                        and health is not None
                        and (health["verdict"] == "failing")
                    )
                    leave = stop_after is not None and session_steps >= stop_after
                    if interrupted or unhealthy or leave:
                        if self.step < config.steps:
                            path = self.save()
                            why = "health_stop: the run is failing; " if unhealthy else ""
                            print(f"\n{why}stopped at step {self.step}; checkpoint: {path}",
                                  flush=True)  # fmt: skip
                            if interrupted:
                                raise KeyboardInterrupt
                            stopped = {"stopped_at_step": self.step, "checkpoint": path}
                            return {**stopped, "health": health} if unhealthy else stopped
            except TrainingDiverged as error:
                kept = latest_checkpoint(config.run_dir)
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
            records = self.parts.log.read()
            summary = summarise(records, wall)
            write_json(os.path.join(config.run_dir, "summary.json"), summary)
            plot_dynamics(records, os.path.join(config.run_dir, "dynamics.png"))
            self.parts.log.close()
            return summary

        return self.parts.dist.on_main(finish)  # rank 0 writes; every rank returns its summary


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
