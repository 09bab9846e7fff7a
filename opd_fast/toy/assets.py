"""The toy world's on-disk assets: cache location, atomic builds and lazily built teachers.

Layout under the cache root ($OPD_FAST_CACHE or ~/.cache/opd_fast):

    <root>/toy/<spec.key()>/
        world.json             spec, facts, which entities each model knows, built models' metrics
        train_prompts.jsonl    OPD prompts {"prompt", "answer", "entity", "student_knows"}
        eval_prompts.jsonl     held-out prompts, same fields
        tokenizer/             the shared tokenizer
        student/ teacher/ ...  HF model dirs (config.json, model.safetensors, tokenizer files,
                               toy_model.json with that model's recipe, metrics and build time)

Every directory is built under a temporary name in the same parent and renamed into place, so
a crashed or concurrent build never leaves a half-written asset behind; a build that loses a
rename race discards its copy and uses the winner's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from opd_fast.toy import data
from opd_fast.toy.spec import FORMAT_VERSION, MODEL_NAMES, STUDENT, TEACHER, ToyWorldSpec
from opd_fast.toy.tokenizer import build_tokenizer, entity_name, vocabulary

MODEL_INFO = "toy_model.json"


def default_cache_root() -> str:
    return os.environ.get("OPD_FAST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "opd_fast"
    )


def _atomic_dir(target: str, build: Callable[[str], None]) -> str:
    """Create `target` by running build(tmp) on a sibling temp dir, then renaming it."""
    if os.path.isdir(target):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(target)}-", dir=parent)
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):  # not a lost race: a real error
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_json(path: str, payload: dict) -> None:
    """Write JSON atomically (temp file + os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


@dataclass
class ToyAssets:
    """Paths of a built toy world. Teachers other than the default are built on first use."""

    spec: ToyWorldSpec
    root: str
    progress: bool = True

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.root, "tokenizer")

    @property
    def train_prompts(self) -> str:
        return os.path.join(self.root, "train_prompts.jsonl")

    @property
    def eval_prompts(self) -> str:
        return os.path.join(self.root, "eval_prompts.jsonl")

    @property
    def student_dir(self) -> str:
        return self.model_dir(STUDENT)

    @property
    def teacher_dir(self) -> str:
        return self.model_dir(TEACHER)

    def teacher(self, name: str = TEACHER) -> str:
        """Directory of the teacher `name` ("teacher", "teacher_other_pattern",
        "teacher_same_pipeline"), building it first if it is not cached."""
        if name == STUDENT:
            raise ValueError("'student' is not a teacher; use assets.student_dir")
        return self.model_dir(name)

    def model_dir(self, name: str) -> str:
        """Directory of model `name` (one of MODEL_NAMES), built on first use (after the model
        it is post-trained from, if any)."""
        recipe = self.spec.recipe(name)  # validates the name
        target = os.path.join(self.root, name)
        if not os.path.isdir(target):
            from opd_fast.toy.build import build_model

            if recipe.init_from is not None:
                self.model_dir(recipe.init_from)
            _atomic_dir(
                target, lambda tmp: build_model(self.spec, self.root, name, tmp, self.progress)
            )
            self._refresh_world_json()
        return target

    def is_built(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name, MODEL_INFO))

    @property
    def world(self) -> dict:
        """world.json, with each built model's toy_model.json merged under "models"."""
        with open(os.path.join(self.root, "world.json"), encoding="utf-8") as handle:
            world = json.load(handle)
        world["models"] = {}
        for name in MODEL_NAMES:
            if self.is_built(name):
                with open(os.path.join(self.root, name, MODEL_INFO), encoding="utf-8") as handle:
                    world["models"][name] = json.load(handle)
        return world

    def _refresh_world_json(self) -> None:
        _write_json(os.path.join(self.root, "world.json"), self.world)


def _build_base(spec: ToyWorldSpec, tmp: str) -> None:
    """Tokenizer, prompt files and world.json (no models) into `tmp`."""
    facts = data.make_facts(spec)
    build_tokenizer(spec).save_pretrained(os.path.join(tmp, "tokenizer"))
    data.write_jsonl(
        os.path.join(tmp, "train_prompts.jsonl"), data.prompt_rows(spec, facts, "train")
    )
    data.write_jsonl(os.path.join(tmp, "eval_prompts.jsonl"), data.prompt_rows(spec, facts, "eval"))
    knows = {
        name: sorted(entity_name(e) for e in facts.known_by(spec.recipe(name).knows))
        for name in MODEL_NAMES
    }
    world = {
        "format_version": FORMAT_VERSION,
        "key": spec.key(),
        "spec": spec.to_dict(),
        "vocab_size": len(vocabulary(spec)),
        "values": {entity_name(e): v for e, v in enumerate(facts.values)},
        "student_known": [entity_name(e) for e in facts.student_known],
        "knows": knows,
        "patterns": {name: spec.recipe(name).pattern for name in MODEL_NAMES},
        "phrasing_shifts": {name: spec.recipe(name).phrasing_shift for name in MODEL_NAMES},
        "init_from": {name: spec.recipe(name).init_from for name in MODEL_NAMES},
        "example_responses": {
            p: data.response_text(0, 4, facts.values[0], p) for p in data.PATTERNS
        },
        "models": {},
    }
    if spec.graded_values:  # absent from the default world's world.json, as before
        world["decoys"] = {entity_name(e): list(d) for e, d in enumerate(facts.decoys) if d}
    _write_json(os.path.join(tmp, "world.json"), world)


TOY = "toy"  # a model or data value that selects the embedded toy default

# What TOY stands for, per config key.
_TOY_PATHS = {
    "student": lambda assets: assets.student_dir,
    "teacher": lambda assets: assets.teacher_dir,
    "train_data": lambda assets: assets.train_prompts,
    "eval_data": lambda assets: assets.eval_prompts,
}


def resolve_toy(values: dict[str, str | None], progress: bool = True) -> dict[str, str | None]:
    """`values` (student / teacher / train_data / eval_data -> path) with every TOY replaced by
    the embedded default's path; the toy world is built (or loaded) only when one is asked for."""
    if TOY not in values.values():
        return dict(values)
    assets = toy_assets(progress=progress)
    return {
        key: _TOY_PATHS[key](assets) if value == TOY else value for key, value in values.items()
    }


def toy_assets(
    spec: ToyWorldSpec | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    build_default_models: bool = True,
) -> ToyAssets:
    """The toy world for `spec` (default ToyWorldSpec()), built into the cache if missing.

    The student and the default teacher are built now unless `build_default_models` is False;
    other teachers when `assets.teacher(name)` first asks for them.
    """
    spec = spec or ToyWorldSpec()
    root = os.path.join(cache_dir or default_cache_root(), "toy", spec.key())
    _atomic_dir(root, lambda tmp: _build_base(spec, tmp))
    assets = ToyAssets(spec=spec, root=root, progress=progress)
    if build_default_models:
        assets.model_dir(STUDENT)
        assets.model_dir(TEACHER)
    return assets


__all__ = ["TOY", "ToyAssets", "default_cache_root", "resolve_toy", "toy_assets"]
