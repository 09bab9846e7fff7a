"""Answer extraction and grading: the last \\boxed{...} of a response vs the reference answer.

Uses math-verify for symbolic equivalence when it is installed, else normalised exact match.
"""

from __future__ import annotations

import re

try:  # optional: symbolic equivalence for real math data
    from math_verify import parse as _mv_parse
    from math_verify import verify as _mv_verify
except ImportError:  # pragma: no cover - depends on the environment
    _mv_parse = _mv_verify = None

_BOXED = "\\boxed{"


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for position in range(begin, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:position]
    return None


def normalise(answer: str) -> str:
    """Drop whitespace, a trailing period and surrounding $ so '{ 1 }' and '1' compare equal."""
    answer = re.sub(r"\s+", "", answer)
    return answer.strip("$").rstrip(".")


def is_correct(response: str, reference: str) -> bool:
    """True when the response's boxed answer equals the reference answer."""
    predicted = extract_boxed(response)
    if predicted is None:
        return False
    if normalise(predicted) == normalise(reference):
        return True
    if _mv_verify is not None:
        try:
            return bool(_mv_verify(_mv_parse(f"${reference}$"), _mv_parse(f"${predicted}$")))
        except Exception:  # math-verify raises on unparsable input; that is a wrong answer
            return False
    return False
