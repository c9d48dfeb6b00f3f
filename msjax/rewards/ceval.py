"""C-Eval letter grading, as the original's metric script does it.

The original takes the FIRST match of `(?i)(?:答案|answer)\\s*[:：]\\s*([A-Da-d])\\.?` in the text
it grades (its client's prompt + response: a letter written in the prompt counts) and compares
that letter, lower-cased, with the gold letter, stripped and lower-cased; no match reads as "".
"""

from __future__ import annotations

import re

ANSWER_RE = re.compile(r"(?i)(?:答案|answer)\s*[:：]\s*([A-Da-d])\.?")


def ceval_letter(text: str) -> str | None:
    """The lower-case answer letter of `text` (first match), or None."""
    m = ANSWER_RE.search(text)
    return m.group(1).lower() if m else None


def ceval_reward(text: str, gold: str) -> float:
    """1.0 when the answer letter of `text` is the gold letter ("A".."D", any case), else 0.0."""
    return float((ceval_letter(text) or "") == str(gold).strip().lower())
