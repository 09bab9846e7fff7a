"""The toy world's specification: a frozen dataclass whose hash keys the asset cache.

Everything the build depends on (facts, vocabulary, model shapes, training schedules) is a
field here, so changing any of it selects a different cache directory and triggers a rebuild.
`FORMAT_VERSION` is bumped whenever the build code changes what it produces for a given spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 2

# Names of the models the world can build. "student" and "teacher" are built eagerly;
# the other teachers only when asked for.
STUDENT = "student"
TEACHER = "teacher"
TEACHER_OTHER_PATTERN = "teacher_other_pattern"
TEACHER_SAME_PIPELINE = "teacher_same_pipeline"
MODEL_NAMES = (STUDENT, TEACHER, TEACHER_OTHER_PATTERN, TEACHER_SAME_PIPELINE)
TEACHER_NAMES = (TEACHER, TEACHER_OTHER_PATTERN, TEACHER_SAME_PIPELINE)


@dataclass(frozen=True)
class ArchSpec:
    """Shape of a tiny Qwen3 causal LM (tied embeddings)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class TrainSpec:
    """Training schedule (AdamW, linear warmup then cosine decay to 10%)."""

    steps: int = 250
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ModelRecipe:
    """What one model of the world is trained on.

    knows: "subset" (the student's entities only) or "all" entities.
    pattern: the response format ("thinking pattern") it is trained to write.
    phrasing_shift: ranks by which its synonym preferences are rotated against the pattern's
        (see opd_fast.toy.phrasing); 0 writes the pattern's own phrasing.
    init_from: the model whose weights it starts from (post-training), or None (from scratch).
    """

    knows: str
    pattern: str
    arch: ArchSpec
    train: TrainSpec
    seed_offset: int
    phrasing_shift: int = 0
    init_from: str | None = None


@dataclass(frozen=True)
class ToyWorldSpec:
    """A synthetic fact-recall-plus-arithmetic task and the models trained on it.

    Each entity (e000, e001, ...) has a secret value in [0, n_values). A prompt asks for
    "value of entity + operand"; the student only ever sees worked examples for a
    `student_known_fraction` of the entities, the teachers (except teacher_same_pipeline) for all.
    For every entity, `eval_operands_per_entity` operands are held out of all training and form
    the evaluation prompts; the rest are the OPD training prompts. Every model also trains on
    `repeat_copies` knowledge-free "repeat <entity> ?" examples per entity, for all entities, so
    the student knows every entity name (and can copy it) without knowing its value.
    Connective words of the responses are drawn from `synonyms_per_slot` synonyms with Zipf
    exponent `synonym_zipf` (see opd_fast.toy.phrasing); 1 synonym makes responses deterministic.

    The student is trained from scratch. The teachers "teacher" and "teacher_other_pattern" are
    post-trained from the student's weights on every entity (`teacher_train`), the way a teacher
    with extra training of the same family is: they share the student's base, so tokens the
    task does not decide are ranked alike. The matched teacher's phrasing drifted in that
    post-training (`teacher_phrasing_shift`: its synonym preferences are rotated by that many
    ranks), so the top-k sets differ where the wording is free as well as where knowledge is
    missing; the other-pattern teacher writes another format. teacher_same_pipeline is a larger
    model trained from scratch on exactly the student's data.
    """

    seed: int = 0
    n_entities: int = 100
    n_values: int = 10
    n_operands: int = 10
    student_known_fraction: float = 0.5
    eval_operands_per_entity: int = 2
    repeat_copies: int = 1
    synonyms_per_slot: int = 24
    synonym_zipf: float = 1.5
    min_vocab_size: int = 512
    student_arch: ArchSpec = field(default_factory=ArchSpec)
    large_arch: ArchSpec = field(
        default_factory=lambda: ArchSpec(
            hidden_size=192, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=512
        )
    )
    student_train: TrainSpec = field(default_factory=TrainSpec)
    # Post-training of the teachers that start from the student's weights.
    teacher_train: TrainSpec = field(
        default_factory=lambda: TrainSpec(steps=150, lr=1e-3, warmup_steps=10)
    )
    teacher_phrasing_shift: int = 4
    # Graded knowledge (the "graded" world; empty in the default world): when set, the
    # student's data also holds worked examples of the entities outside its known set, whose
    # value is drawn per example from that entity's candidates with these weights. The first
    # weight is the true value's, each further one a decoy's (distinct wrong values, fixed per
    # entity by the seed, see data.make_facts). E.g. (0.3, 0.5, 0.2): the student half-knows
    # such an entity, its favourite value is a wrong but plausible one, and the true value
    # still carries real mass, where the teacher (trained on true values) ranks it first.
    graded_values: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.n_entities < 2 or self.n_values < 2 or self.n_operands < 2:
            raise ValueError("n_entities, n_values and n_operands must be at least 2")
        if not 0.0 < self.student_known_fraction < 1.0:
            raise ValueError("student_known_fraction must be in (0, 1)")
        if self.synonyms_per_slot < 1 or self.synonym_zipf < 0:
            raise ValueError("synonyms_per_slot must be >= 1 and synonym_zipf >= 0")
        if self.repeat_copies < 0:
            raise ValueError("repeat_copies must be >= 0")
        if not 0 < self.eval_operands_per_entity < self.n_operands:
            raise ValueError("eval_operands_per_entity must be in [1, n_operands)")
        if not 0 <= self.teacher_phrasing_shift < self.synonyms_per_slot:
            raise ValueError("teacher_phrasing_shift must be in [0, synonyms_per_slot)")
        if self.n_entities > 10_000:
            raise ValueError("n_entities must be at most 10000 (entity names have 4 digits)")
        if not isinstance(self.graded_values, tuple):  # a list from JSON: keep the spec hashable
            object.__setattr__(self, "graded_values", tuple(self.graded_values))
        if self.graded_values:
            weights = self.graded_values
            if len(weights) < 2 or len(weights) > self.n_values:
                raise ValueError("graded_values needs 2 to n_values weights (true value, decoys)")
            if min(weights) <= 0 or abs(sum(weights) - 1.0) > 1e-9:
                raise ValueError("graded_values must be positive and sum to 1")

    def recipe(self, name: str) -> ModelRecipe:
        """Training recipe of the model called `name` (one of MODEL_NAMES)."""
        recipes = {
            STUDENT: ModelRecipe("subset", "chain", self.student_arch, self.student_train, 1),
            TEACHER: ModelRecipe(
                "all",
                "chain",
                self.student_arch,
                self.teacher_train,
                2,
                phrasing_shift=self.teacher_phrasing_shift,
                init_from=STUDENT,
            ),
            TEACHER_OTHER_PATTERN: ModelRecipe(
                "all", "other", self.student_arch, self.teacher_train, 3, init_from=STUDENT
            ),
            TEACHER_SAME_PIPELINE: ModelRecipe(
                "subset", "chain", self.large_arch, self.student_train, 4
            ),
        }
        if name not in recipes:
            raise ValueError(f"unknown toy model {name!r}; choose from {', '.join(MODEL_NAMES)}")
        return recipes[name]

    def to_dict(self) -> dict[str, Any]:
        """Every field, except those added after format 2 while they hold their default: the
        default world's dict, and hence its cache key, are what they were before they existed."""
        values = dataclasses.asdict(self)
        for name in _LATER_FIELDS:
            if values[name] == _DEFAULTS[name]:
                del values[name]
            else:
                values[name] = list(values[name])
        return values

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyWorldSpec:
        data = dict(data)
        for key in ("student_arch", "large_arch"):
            if isinstance(data.get(key), dict):
                data[key] = ArchSpec(**data[key])
        for key in ("student_train", "teacher_train"):
            if isinstance(data.get(key), dict):
                data[key] = TrainSpec(**data[key])
        return cls(**data)

    def key(self) -> str:
        """Cache key: format version plus a hash of every field."""
        blob = json.dumps({"format": FORMAT_VERSION, "spec": self.to_dict()}, sort_keys=True)
        return f"world-v{FORMAT_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# Fields added to the spec after format 2; to_dict leaves them out while they hold their
# default, so existing worlds keep their keys.
_LATER_FIELDS = ("graded_values",)
_DEFAULTS = {name: getattr(ToyWorldSpec(), name) for name in _LATER_FIELDS}

# Named worlds (`opd-fast repro --world NAME`). "default" is the embedded toy world. "graded"
# puts the student's top-k disagreement with the teacher where the mass is: the student
# half-knows every entity outside its known set (its favourite value for it is a decoy, the
# true value second, one more decoy third), and the matched teacher phrases exactly like the
# student (no drift), so the free wording, whose low-ranked synonyms make the rest of the
# top-16 sets, carries little of the disagreement's mass (docs/repro-2026-12-03-graded-world).
# The two worlds differ in two fields; "graded_drift" and "no_drift" each take one of them, so
# that a finding can be pinned on one change (the ablation in docs/repro-2026-12-03-graded-world).
WORLDS: dict[str, ToyWorldSpec] = {
    "default": ToyWorldSpec(),
    "graded": ToyWorldSpec(graded_values=(0.3, 0.5, 0.2), teacher_phrasing_shift=0),
    "graded_drift": ToyWorldSpec(graded_values=(0.3, 0.5, 0.2)),
    "no_drift": ToyWorldSpec(teacher_phrasing_shift=0),
}


def world_spec(name: str) -> ToyWorldSpec:
    """The spec of the named world (one of WORLDS)."""
    if name not in WORLDS:
        raise ValueError(f"unknown toy world {name!r}; choose from {', '.join(WORLDS)}")
    return WORLDS[name]
