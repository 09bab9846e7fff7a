"""Rollout engines: what samples responses for the trainer (rollouts, evaluation, the cold
start's teacher data, the paper's diagnostics), behind one interface (`base.RolloutEngine`).

`batch` is the RolloutBatch every engine returns; `sampling.sample_examples` is the one way
to sample examples with an engine. `hf` is Hugging Face `generate` on the model in this
process (the default); `vllm` is a vLLM engine colocated with the trainer (the optional extra
`opd_fast[vllm]`), whose weights the trainer refreshes after every optimizer step.
`factory.make_engine` builds the engine a kind names.
"""

from opd_fast.training.rollouts.base import EngineUnavailable, RolloutEngine, SamplingSettings
from opd_fast.training.rollouts.batch import RolloutBatch
from opd_fast.training.rollouts.factory import ENGINES, make_engine
from opd_fast.training.rollouts.sampling import sample_examples

__all__ = [
    "ENGINES",
    "EngineUnavailable",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingSettings",
    "make_engine",
    "sample_examples",
]
