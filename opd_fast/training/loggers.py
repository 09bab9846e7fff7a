"""Where a run's records go besides metrics.jsonl: TensorBoard event files and Weights & Biases,
chosen by the config's `loggers` key ("tensorboard", "wandb", comma-separated). Only rank 0
logs; the other ranks get a log that writes nothing.

Each record's numbers become scalars named "<kind>/<key>" (train/overlap_ratio,
eval/student_accuracy) at the record's step.
"""

from __future__ import annotations

import math
import os
from typing import Any

from opd_fast.training.metrics import MetricsLog

LOGGERS = ("tensorboard", "wandb")


def parse_loggers(text: str) -> list[str]:
    """'tensorboard, wandb' -> ['tensorboard', 'wandb']; unknown names raise ValueError."""
    if isinstance(text, (list, tuple)):  # a YAML list
        text = ",".join(str(name) for name in text)
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise ValueError(
            f"config: loggers: unknown {unknown}; choose from {', '.join(LOGGERS)} "
            "(metrics.jsonl is always written)"
        )
    return names


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    kind = record.get("kind", "record")
    return {
        f"{kind}/{key}": float(value)
        for key, value in record.items()
        if key not in ("kind", "step")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    }


class TensorBoardLogger:
    def __init__(self, run_dir: str, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(
                "config: loggers: 'tensorboard' needs the tensorboard package "
                "(pip install 'opd_fast[tensorboard]' or pip install tensorboard)"
            ) from None
        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for name, value in _scalars(record).items():
            self.writer.add_scalar(name, value, global_step=int(record.get("step", 0)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "config: loggers: 'wandb' needs the wandb package "
                "(pip install 'opd_fast[wandb]' or pip install wandb)"
            ) from None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "opd_fast"),
            name=os.path.basename(os.path.abspath(run_dir)),
            dir=run_dir,
            config=config,
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


class RunLog(MetricsLog):
    """metrics.jsonl plus the chosen loggers: every written record goes to all of them."""

    def __init__(self, path: str, loggers: list | None = None):
        super().__init__(path)
        self.loggers = loggers or []

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class SilentLog(MetricsLog):
    """The log of ranks other than 0: writes nothing, reads nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def read(self) -> list[dict[str, Any]]:
        return []

    def lines(self) -> list[str]:
        return []

    def truncate(self, records: int | None, step: int, saved: list[str] | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def open_run_log(run_dir: str, loggers: str, config: dict, is_main: bool = True) -> MetricsLog:
    """The run's log: on rank 0 metrics.jsonl plus the loggers `loggers` names, else silent.
    A logger whose package is missing raises ValueError naming the package."""
    path = os.path.join(run_dir, "metrics.jsonl")
    names = parse_loggers(loggers)
    if not is_main:
        return SilentLog(path)
    return RunLog(path, [_CLASSES[name](run_dir, config) for name in names])
