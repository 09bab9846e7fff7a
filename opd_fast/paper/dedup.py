"""Prompt de-duplication: exact (after normalisation) and near-duplicate (MinHash over word
shingles, banded LSH, then a true Jaccard check), within a prompt set and against another set
(e.g. keep only prompts held out from the teacher's training data)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

_WORD = re.compile(r"\w+")


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str, size: int = 3) -> set[str]:
    words = normalise(text).split()
    if len(words) < size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _minhash(items: set[str], num_hashes: int) -> list[int]:
    signature = []
    for seed in range(num_hashes):
        salt = seed.to_bytes(4, "little")
        signature.append(
            min(
                int.from_bytes(
                    hashlib.blake2b(salt + item.encode(), digest_size=8).digest(), "little"
                )
                for item in items
            )
        )
    return signature


@dataclass
class DedupResult:
    kept: list[str]
    removed: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, reason, match)


def deduplicate(
    prompts: list[str],
    against: list[str] | None = None,
    *,
    threshold: float = 0.8,
    shingle_size: int = 3,
    num_hashes: int = 64,
    bands: int = 16,
) -> DedupResult:
    """Drop exact and near duplicates (word-shingle Jaccard >= threshold) within `prompts`
    (the first occurrence is kept) and any prompt that nearly matches one in `against`."""
    if num_hashes % bands:
        raise ValueError("num_hashes must be a multiple of bands")
    rows = num_hashes // bands
    buckets: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    reference_texts: list[str] = []
    reference_shingles: list[set[str]] = []
    exact: dict[str, int] = {}

    def index(text: str, item_shingles: set[str]) -> None:
        position = len(reference_texts)
        reference_texts.append(text)
        reference_shingles.append(item_shingles)
        exact.setdefault(normalise(text), position)
        signature = _minhash(item_shingles, num_hashes)
        for band in range(bands):
            buckets.setdefault(
                (band, tuple(signature[band * rows : (band + 1) * rows])), []
            ).append(position)

    def find(text: str, item_shingles: set[str]) -> tuple[str, int] | None:
        same = exact.get(normalise(text))
        if same is not None:
            return "exact duplicate", same
        signature = _minhash(item_shingles, num_hashes)
        candidates = set()
        for band in range(bands):
            candidates.update(
                buckets.get((band, tuple(signature[band * rows : (band + 1) * rows])), [])
            )
        for candidate in sorted(candidates):
            similarity = jaccard(item_shingles, reference_shingles[candidate])
            if similarity >= threshold:
                return f"near duplicate (jaccard {similarity:.2f})", candidate
        return None

    held_out = len(against or [])
    for text in against or []:
        index(text, shingles(text, shingle_size))
    result = DedupResult(kept=[])
    for text in prompts:
        item_shingles = shingles(text, shingle_size)
        match = find(text, item_shingles)
        if match is not None:
            reason, position = match
            source = "held-out set" if position < held_out else "prompts"
            result.removed.append(
                (text, f"{reason} of an entry in the {source}", reference_texts[position])
            )
            continue
        result.kept.append(text)
        index(text, item_shingles)
    return result
