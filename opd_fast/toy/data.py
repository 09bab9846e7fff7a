"""Facts, prompts, responses and training sequences of the toy world.

Task: "what is e017 plus 4 ?" asks for value(e017) + 4, where every entity's value is a
secret digit drawn from the seed. Two response formats ("thinking patterns") exist:

- chain (student, teacher, teacher_same_pipeline):
  "e017 is 7 . 7 plus 4 is 11 . \\boxed{ 11 }"
- other (teacher_other_pattern): restates the question operand first, then recalls, then adds
  operand first: "4 plus e017 . e017 is 7 . 4 plus 7 is 11 . \\boxed{ 11 }"

The connectives (is . plus) are slots filled from synonym sets (opd_fast.toy.phrasing); the
words shown are the canonical fillings. Each pattern prefers different synonyms, so the other
pattern's most likely wording is e.g. "4 w057 e017 w034 e017 w011 7 w034 ...".

Both end with the answer inside \\boxed{ ... }, so a generic boxed-answer grader scores them.
A knowledge-free auxiliary task, "repeat e017 ?" -> "e017 . \\boxed{ e017 }", covers every entity
in every model's training data: the student meets each entity name (and learns to copy it)
without ever seeing the value of an entity outside its known set.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from opd_fast.toy.phrasing import synonyms
from opd_fast.toy.spec import ToyWorldSpec
from opd_fast.toy.tokenizer import BOXED_CLOSE, BOXED_OPEN, entity_name

PATTERNS = ("chain", "other")


@dataclass(frozen=True)
class Facts:
    """The world's ground truth, all derived from the spec's seed.

    values[i]: secret value of entity i.  student_known: sorted entity indices the student
    (and teacher_same_pipeline) is trained on.  eval_operands[i]: operands held out for entity i.
    decoys[i]: in a graded world (spec.graded_values), the wrong values the student's data
    gives entity i beside its true one, most likely first; empty for the student's known
    entities, and everywhere in the default world.
    """

    values: tuple[int, ...]
    student_known: tuple[int, ...]
    eval_operands: tuple[tuple[int, ...], ...]
    decoys: tuple[tuple[int, ...], ...] = ()

    def known_by(self, knows: str) -> tuple[int, ...]:
        """Entity indices a model with recipe.knows == `knows` is trained on."""
        if knows == "all":
            return tuple(range(len(self.values)))
        if knows == "subset":
            return self.student_known
        raise ValueError(f"unknown knowledge set {knows!r}")


def make_facts(spec: ToyWorldSpec) -> Facts:
    """Values balanced over [0, n_values) and shuffled; the student's entities are chosen per
    value (stratified), so every value, and hence every addition step, occurs in its data."""
    rng = random.Random(f"toy-facts-{spec.seed}")
    values = [i % spec.n_values for i in range(spec.n_entities)]
    rng.shuffle(values)
    by_value: dict[int, list[int]] = {}
    for entity, value in enumerate(values):
        by_value.setdefault(value, []).append(entity)
    n_known = max(1, round(spec.student_known_fraction * spec.n_entities))
    known: list[int] = []
    # Round-robin over values so the known set stays balanced for any fraction.
    pools = [rng.sample(group, len(group)) for _, group in sorted(by_value.items())]
    while len(known) < n_known:
        for pool in pools:
            if pool and len(known) < n_known:
                known.append(pool.pop())
    eval_operands = tuple(
        tuple(sorted(rng.sample(range(spec.n_operands), spec.eval_operands_per_entity)))
        for _ in range(spec.n_entities)
    )
    if not spec.graded_values:
        return Facts(tuple(values), tuple(sorted(known)), eval_operands)
    # A separate stream, so the graded world's values, known set and held-out operands are the
    # default world's (for the same seed).
    decoy_rng = random.Random(f"toy-decoys-{spec.seed}")
    known_set = set(known)
    decoys = tuple(
        ()
        if entity in known_set
        else tuple(
            decoy_rng.sample(
                [v for v in range(spec.n_values) if v != values[entity]],
                len(spec.graded_values) - 1,
            )
        )
        for entity in range(spec.n_entities)
    )
    return Facts(tuple(values), tuple(sorted(known)), eval_operands, decoys)


def graded_candidates(
    spec: ToyWorldSpec, facts: Facts, entity: int
) -> tuple[list[int], list[float]]:
    """(values, weights) the student's data draws entity's value from: the true value alone
    for a known entity (or in the default world), else the true value and its decoys with
    spec.graded_values."""
    if not facts.decoys or not facts.decoys[entity]:
        return [facts.values[entity]], [1.0]
    return [facts.values[entity], *facts.decoys[entity]], list(spec.graded_values)


def prompt_text(entity: int, operand: int) -> str:
    return f"what is {entity_name(entity)} plus {operand} ?"


def response_text(
    entity: int,
    operand: int,
    value: int,
    pattern: str,
    spec: ToyWorldSpec | None = None,
    rng: random.Random | None = None,
    phrasing_shift: int = 0,
) -> str:
    """The worked answer in `pattern`, without <eos>. Connective slots take their canonical
    word, or a Zipf-drawn synonym (ranking rotated by `phrasing_shift`) when `spec` and `rng`
    are given."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")

    def slot(canonical: str) -> str:
        if rng is None or spec is None:
            return canonical
        words, probs = synonyms(spec, pattern, canonical, phrasing_shift)
        return rng.choices(words, probs)[0]

    name, total = entity_name(entity), value + operand
    boxed = f"{BOXED_OPEN} {total} {BOXED_CLOSE}"
    if pattern == "chain":
        words = [name, slot("is"), value, slot("."), value, slot("plus"), operand, slot("is")]
        words += [total, slot("."), boxed]
    else:
        words = [operand, slot("plus"), name, slot("."), name, slot("is"), value, slot(".")]
        words += [operand, slot("plus"), value, slot("is"), total, slot("."), boxed]
    return " ".join(str(word) for word in words)


def answer_text(entity: int, operand: int, facts: Facts) -> str:
    return str(facts.values[entity] + operand)


def train_pairs(
    spec: ToyWorldSpec, facts: Facts, entities: tuple[int, ...]
) -> list[tuple[int, int]]:
    """(entity, operand) pairs of `entities` outside the held-out evaluation operands."""
    return [
        (entity, operand)
        for entity in entities
        for operand in range(spec.n_operands)
        if operand not in facts.eval_operands[entity]
    ]


def eval_pairs(facts: Facts) -> list[tuple[int, int]]:
    return [(e, x) for e, operands in enumerate(facts.eval_operands) for x in operands]


def repeat_text(entity: int) -> tuple[str, str]:
    """(prompt, response) of the knowledge-free repeat task for `entity`."""
    name = entity_name(entity)
    return f"repeat {name} ?", f"{name} . {BOXED_OPEN} {name} {BOXED_CLOSE}"


def training_stream(
    spec: ToyWorldSpec,
    facts: Facts,
    knows: str,
    pattern: str,
    count: int,
    phrasing_shift: int = 0,
) -> list[tuple[str, str]]:
    """`count` (prompt, response) training examples drawn with replacement, with fresh synonym
    draws, from a pool holding each (entity, operand) worked example of the entities this model
    knows (non-held-out operands only) once and every entity's repeat example
    `spec.repeat_copies` times. Seeded by the world seed, `knows`, `pattern` and
    `phrasing_shift` alone: models with the same knowledge and phrasing (student,
    teacher_same_pipeline) see the same stream.

    In a graded world (spec.graded_values) the "subset" pool also holds the worked examples of
    every other entity, each drawing its value from the entity's graded candidates (true
    value and decoys) afresh whenever it is drawn."""
    rng = random.Random(f"toy-stream-{spec.seed}-{knows}-{pattern}-{phrasing_shift}")
    pool: list[tuple[int, int]] = list(train_pairs(spec, facts, facts.known_by(knows)))
    graded = knows == "subset" and bool(spec.graded_values)
    if graded:
        known = set(facts.student_known)
        others = tuple(e for e in range(spec.n_entities) if e not in known)
        pool += train_pairs(spec, facts, others)
    pool += [(e, -1) for e in range(spec.n_entities) for _ in range(spec.repeat_copies)]
    examples = []
    for _ in range(count):
        entity, operand = pool[rng.randrange(len(pool))]
        if operand < 0:
            examples.append(repeat_text(entity))
        else:
            value = facts.values[entity]
            if graded and facts.decoys[entity]:
                candidates, weights = graded_candidates(spec, facts, entity)
                value = rng.choices(candidates, weights)[0]
            response = response_text(entity, operand, value, pattern, spec, rng, phrasing_shift)
            examples.append((prompt_text(entity, operand), response))
    return examples


def prompt_rows(spec: ToyWorldSpec, facts: Facts, split: str) -> list[dict]:
    """Rows {"prompt", "answer", "entity", "student_knows"} of the "train" (OPD) or "eval" split.

    train: every entity's non-held-out operands (covers the entities the student never saw);
    eval: every entity's held-out operands (no model was trained on these prompts).
    """
    if split == "train":
        pairs = train_pairs(spec, facts, tuple(range(spec.n_entities)))
        random.Random(f"toy-train-order-{spec.seed}").shuffle(pairs)
    elif split == "eval":
        pairs = eval_pairs(facts)
    else:
        raise ValueError(f"unknown split {split!r}")
    known = set(facts.student_known)
    return [
        {
            "prompt": prompt_text(e, x),
            "answer": answer_text(e, x, facts),
            "entity": entity_name(e),
            "student_knows": e in known,
        }
        for e, x in pairs
    ]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
