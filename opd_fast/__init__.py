"""opd_fast: fast on-policy distillation of language models.

The fused top-k reverse-KL op (CPU and CUDA kernels) is `opd_loss` / `OPDLoss`; its
pure-PyTorch reference is `opd_fast.reference`.
"""

from opd_fast._extension import build_info, extension_available
from opd_fast.loss import NonFiniteLogitsError, OPDLoss, OPDLossOutput, opd_loss
from opd_fast.reference import ESTIMATORS, TOKEN_METRIC_NAMES, VARIANTS

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "NonFiniteLogitsError",
    "OPDLoss",
    "OPDLossOutput",
    "TOKEN_METRIC_NAMES",
    "VARIANTS",
    "build_info",
    "extension_available",
    "opd_loss",
]
