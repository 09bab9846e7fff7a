"""Phrasing variability of the response patterns: each connective slot is a synonym set.

The chain responses have three connective slots ("is", ".", "plus"). Each is filled from a set
of `spec.synonyms_per_slot` words: the canonical word and synthetic synonyms (w000, ...), with
Zipf probabilities p(rank) ~ rank ** -spec.synonym_zipf. The models thus share real
uncertainty over tens of tokens at those positions, so a top-16 set carries probability mass.

Both patterns use the same synonym sets (a teacher of the other pattern still "reads" the
student's words) but rank them differently: the "other" pattern's ranking is the chain ranking
rotated by half the set, so its favourite words are the chain pattern's mid-ranked ones (top-16
sets share 8 of 16 words when synonyms_per_slot = 24). A `shift` rotates a pattern's ranking
further: the matched teacher's drifted phrasing (spec.teacher_phrasing_shift = 4 keeps 12 of
its 16 favourite words in the student's top 16, in another order).
"""

from __future__ import annotations

from opd_fast.toy.spec import ToyWorldSpec

# Canonical words of the slots, in a fixed order: filler words are assigned to slots in this
# order, so adding a slot at the end keeps the others' words.
SLOTS: tuple[str, ...] = ("is", ".", "plus")


def filler_word(index: int) -> str:
    return f"w{index:03d}"


def fillers_needed(spec: ToyWorldSpec) -> int:
    """Filler words the synonym sets use (the vocabulary holds at least this many)."""
    return len(SLOTS) * (spec.synonyms_per_slot - 1)


def synonyms(
    spec: ToyWorldSpec, pattern: str, canonical: str, shift: int = 0
) -> tuple[list[str], list[float]]:
    """(words, probabilities) of the slot `canonical` as written by `pattern` with its ranking
    rotated by `shift`, most likely first."""
    group = SLOTS.index(canonical)
    extra = spec.synonyms_per_slot - 1
    words = [canonical] + [filler_word(group * extra + i) for i in range(extra)]
    if pattern not in ("chain", "other"):
        raise ValueError(f"unknown pattern {pattern!r}")
    # The other pattern's ranking is the chain ranking rotated by half the set.
    start = ((len(words) // 2 if pattern == "other" else 0) + shift) % len(words)
    words = words[start:] + words[:start]
    weights = [(rank + 1) ** -spec.synonym_zipf for rank in range(len(words))]
    total = sum(weights)
    return words, [w / total for w in weights]
