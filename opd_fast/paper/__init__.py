"""The paper's tools, around training rather than in it: `probe` (before training: how well
each teacher's top-k sets match the student's), `diagnostics` (per-token metrics of rollouts,
the sequence-reward AUROC, metrics by response position, the teacher's advantage on student
prefixes), `repro` (the paper's findings replicated on the toy world) and `dedup` (exact and
near-duplicate prompts).

Imports: opd_fast.training, opd_fast.teachers, opd_fast.models, opd_fast.op, opd_fast.toy.
"""
