"""Module paths of opd_fast 0.1 that moved in the layout of op / teachers / training / paper /
serving / cli (CHANGELOG.md lists them). Importing an old path still works: it gives the new
module, with a DeprecationWarning naming it."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "opd_fast._extension": "opd_fast.op._extension",
    "opd_fast.ops": "opd_fast.op.kernels",
    "opd_fast.loss": "opd_fast.op.loss",
    "opd_fast.payload": "opd_fast.op.payload",
    "opd_fast.reference": "opd_fast.op.reference",
    "opd_fast.teacher": "opd_fast.teachers.local",
    "opd_fast.serving.client": "opd_fast.teachers.http",
    "opd_fast.serving.remote_teacher": "opd_fast.teachers.remote",
    "opd_fast.serving.openai_teacher": "opd_fast.teachers.openai",
    "opd_fast.serving.spans": "opd_fast.teachers.payload_batch",
    "opd_fast.config": "opd_fast.training.config",
    "opd_fast.recipes": "opd_fast.training.recipes",
    "opd_fast.trainer": "opd_fast.training.trainer",
    "opd_fast.rollout": "opd_fast.training.rollout",
    "opd_fast.data": "opd_fast.training.data",
    "opd_fast.grading": "opd_fast.training.grading",
    "opd_fast.checkpoint": "opd_fast.training.checkpoint",
    "opd_fast.metrics": "opd_fast.training.metrics",
    "opd_fast.plots": "opd_fast.training.plots",
    "opd_fast.sft": "opd_fast.training.cold_start",
    "opd_fast.probe": "opd_fast.paper.probe",
    "opd_fast.diagnostics": "opd_fast.paper.diagnostics",
    "opd_fast.repro": "opd_fast.paper.repro",
    "opd_fast.dedup": "opd_fast.paper.dedup",
    "opd_fast.cli_recipes": "opd_fast.cli.paper",
    "opd_fast.testing": "opd_fast.toy.tiny",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path will be removed",
            DeprecationWarning,
            stacklevel=3,
        )
        module = importlib.import_module(new)
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module):
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
