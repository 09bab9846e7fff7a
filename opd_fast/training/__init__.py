"""Training: the OPD loop and everything it needs, one concern per module.

`config` (TrainConfig, the keys) and `recipes` (named configs); `pair` loads the student and
its teacher; `rollout` samples responses; `scoring` is where rollouts, the teacher and the
loss meet; `trainer` runs the steps (`train`); `data` and `grading` read prompts and grade
answers; `checkpoint`, `metrics` and `plots` write the run folder; `cold_start` is the
off-policy SFT before OPD.

Imports: opd_fast.teachers, opd_fast.models, opd_fast.op, opd_fast.toy.
"""
