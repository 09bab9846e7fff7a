"""Training: the OPD loop and everything it needs, one concern per module.

`config` (TrainConfig, the keys) and `recipes` (named configs); `builder` turns a config into
a run's parts (`pair` loads the student and its teacher); `trainer` runs the steps (`train`),
each step the five stages of the `step` package: rollout, score (where rollouts, the teacher
and the loss meet: `step/score.py`), update, sync, record. `rollouts` holds the engines that
sample (and the batch they return); `evaluation` measures accuracy; `checkpoints` saves and
resumes (single-process or sharded, behind one interface) and exports; `data` and `grading`
read prompts and grade answers; `metrics`, `loggers` and `plots` write the run folder;
`distributed` is torchrun and FSDP2; `off_policy` the engine-vs-trainer gap; `cold_start` the
off-policy SFT before OPD.

Imports: opd_fast.teachers, opd_fast.models, opd_fast.op, opd_fast.toy.
"""
