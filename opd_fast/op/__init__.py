"""The fused top-k reverse-KL op: the product's core, usable without anything else here.

Owns the op's names and limits (`names`), loading the compiled extension (`_extension`), the
Python face of the CPU/CUDA kernels with their fake kernels and autograd (`kernels`), the
public loss with its argument checks (`loss`: `opd_loss`, `OPDLoss`), the same loss straight
from hidden states in chunks (`linear`: `linear_opd_loss`, `LinearTeacher`), the teacher payload
(`payload`) and the readable pure-PyTorch reference the kernels are tested against
(`reference`). The kernels themselves are in csrc/; the math in docs/math.md.

Imports: torch and numpy only, nothing else of opd_fast.
"""

from opd_fast.op._extension import build_info, extension_available
from opd_fast.op.linear import LinearTeacher, linear_opd_loss
from opd_fast.op.loss import NonFiniteLogitsError, OPDLoss, OPDLossOutput, opd_loss
from opd_fast.op.names import ESTIMATORS, MAX_K, TOKEN_METRIC_NAMES, VARIANTS
from opd_fast.op.payload import TeacherPayload, payload_from_logits

__all__ = [
    "ESTIMATORS",
    "MAX_K",
    "LinearTeacher",
    "NonFiniteLogitsError",
    "OPDLoss",
    "OPDLossOutput",
    "TOKEN_METRIC_NAMES",
    "TeacherPayload",
    "VARIANTS",
    "build_info",
    "extension_available",
    "linear_opd_loss",
    "opd_loss",
    "payload_from_logits",
]
