"""opd_fast: fast on-policy distillation of language models.

The public face. The fused top-k reverse-KL op (CPU and CUDA kernels) is `opd_loss` /
`OPDLoss`, with the teacher given as logits or as a `TeacherPayload`; `train` runs OPD from a
config. The package's layers, each importing only those below it:

    cli        the opd-fast command line
    paper      the paper's tools: probe, diagnostics, repro, dedup
    training   the OPD loop: config, pair loading, rollouts, scoring, checkpoints, metrics
    serving    the teacher server
    teachers   one Teacher interface: in process, remote server, OpenAI-compatible engine
    wire       the teacher server's wire format, spoken by the server and its clients
    models     loading Hugging Face models; what student and teacher must share
    toy        the embedded toy world (and tiny models for tests)
    op         the fused op, its names, its reference (docs/math.md states the math)
"""

from opd_fast.op import *  # noqa: F403  (the op's public names are the package's)
from opd_fast.op import __all__ as _op_names

__version__ = "0.1.0"


def train(config=None, *, resume: bool = False, teacher=None) -> dict:
    """Run OPD training; see opd_fast.training.trainer.train (imports transformers on use)."""
    from opd_fast.training.trainer import train as run

    return run(config, resume=resume, teacher=teacher)


__all__ = [*_op_names, "train"]
