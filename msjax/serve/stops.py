"""Stop strings matched on the DECODED text (as the original's vLLM engine does) and the SPRM
steps of a response cut short by them (or by a per-request token limit).

A response is cut after the first token whose decoded text contains a stop string; the returned
text ends right after that stop string (kept, as the original server asks vLLM to). The step
scores of the cut response are the streamed scores of the steps that still count under REFERENCE
section 2's inference rule in the shorter text. Cutting can only drop steps, except when it removes
the text's only `<think>` (then earlier delimiters start to count, and their scores were never
computed): `steps_after_cut` returns None and the caller rescores that text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from msjax.data.step_labels import step_positions


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated response.

    tokens: generated ids (EOS / stop tokens included); finish: "eos" | "stop" | "length";
    score: SPRM trajectory score; step_scores / step_positions: the counted steps (sigmoid score,
    position in prompt + response of the token scored); text: the response text returned.
    """

    tokens: list[int]
    finish: str
    score: float
    step_scores: list[float]
    step_positions: list[int]
    text: str = ""


def find_stop(
    tokens: Sequence[int], stops: Sequence[str], decode: Callable[[Sequence[int]], str]
) -> tuple[int, str] | None:
    """(k, text) for the shortest prefix tokens[:k] whose decoded text holds a stop string, with
    text cut right after that stop string's first occurrence (the first stop string of `stops`
    found there); None when the decoded response holds none. Binary search: O(log n) decodes."""
    if not stops or not any(s in decode(tokens) for s in stops):
        return None
    lo, hi = 1, len(tokens)  # hi always holds a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(tokens[:mid]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    text = decode(tokens[:hi])
    stop = next(s for s in stops if s in text)
    return hi, text[: text.index(stop) + len(stop)]


def steps_after_cut(
    prompt: Sequence[int],
    sample: Sample,
    k: int,
    step_ids: Sequence[int],
    think_start_id: int | None,
    think_end_id: int | None,
) -> Sample | None:
    """`sample` cut to its first k tokens, finish reason "stop" or "length" left to the caller
    (this returns finish unchanged), with the steps that count in the shorter text; None when a
    step counts there that was not scored during decoding (see the module docstring)."""
    ids = [*prompt, *sample.tokens[:k]]
    keep = step_positions(ids, step_ids, think_start_id, think_end_id, len(prompt) - 1).tolist()
    known = dict(zip(sample.step_positions, sample.step_scores, strict=True))
    if any(p not in known for p in keep):
        return None
    scores = [known[p] for p in keep]
    return dataclasses.replace(
        sample,
        tokens=list(sample.tokens[:k]),
        score=geometric_mean(scores),
        step_scores=scores,
        step_positions=keep,
    )


def geometric_mean(step_scores: Sequence[float]) -> float:
    """Trajectory score of sigmoid step scores: geometric mean with scores clamped at 1e-10 (0
    without steps), REFERENCE section 1, in NumPy (an eager jnp call would compile per length)."""
    if not step_scores:
        return 0.0
    return float(np.exp(np.log(np.maximum(np.asarray(step_scores, np.float64), 1e-10)).mean()))
