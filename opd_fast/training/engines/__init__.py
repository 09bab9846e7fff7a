"""Rollout engines: what samples responses for the trainer (rollouts, evaluation, the cold
start's teacher data), behind one interface (`base.RolloutEngine`).

`hf` is Hugging Face `generate` on the model in this process (the default); `vllm` is a vLLM
engine colocated with the trainer (the optional extra `opd_fast[vllm]`), whose weights the
trainer refreshes after every optimizer step. `base` holds the interface, `factory.make_engine`
builds the engine a kind names.
"""

from opd_fast.training.engines.base import EngineUnavailable, RolloutEngine, SamplingSettings
from opd_fast.training.engines.factory import ENGINES, make_engine

__all__ = ["ENGINES", "EngineUnavailable", "RolloutEngine", "SamplingSettings", "make_engine"]
