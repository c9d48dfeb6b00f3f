"""Test-time scaling: Best-of-N by SPRM trajectory score (the paper's low / medium / high modes),
majority and SPRM-weighted votes over final answers, and the accuracy metrics that compare them.

Selection never considers a candidate that early pruning dropped (its response is unfinished);
pruning keeps at least one candidate per prompt, so every prompt has a choice. Votes group
answers by their `msjax.rewards.math.canonical` string (spacing, `$`, `\\dfrac` vs `\\frac`
... normalised; no symbolic equivalence); a candidate without an answer never wins a vote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from msjax.generate.sampler import Sampler, SampleResult

MODES = {"low": 2, "medium": 8, "high": 32}
SELECTIONS = ("bon", "majority", "weighted")


def resolve_k(mode: str | None = None, k: int | None = None) -> int:
    """Candidates per prompt from a mode (low=2, medium=8, high=32) or an explicit k >= 1."""
    if mode is not None and k is not None:
        raise ValueError(f"give a mode ({mode!r}) or k ({k}), not both.")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} candidates per prompt must be an int >= 1.")
        return k
    if mode is None:
        raise ValueError(f"give a mode ({sorted(MODES)}) or k.")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)} or give k.")
    return MODES[mode]


def _answer_key(answer: str | None) -> str | None:
    from msjax.rewards.math import canonical

    return None if answer is None else canonical(answer)


def best_of_n(scores: Sequence[float], eligible: Sequence[bool] | None = None) -> int:
    """Index of the highest score among eligible candidates (ties: the first)."""
    s = np.asarray(scores, np.float64)
    ok = np.ones(len(s), bool) if eligible is None else np.asarray(eligible, bool)
    if not ok.any():
        raise ValueError("no eligible candidate to choose from.")
    return int(np.argmax(np.where(ok, s, -np.inf)))


def vote(
    answers: Sequence[str | None],
    weights: Sequence[float] | None = None,
    eligible: Sequence[bool] | None = None,
) -> int:
    """Index of a candidate carrying the winning answer.

    Each eligible candidate with an answer adds its weight (1 for a majority vote, its SPRM
    score for a weighted vote) to its answer's total. The answer with the largest total wins
    (ties: the answer seen first); the returned index is its highest-weighted candidate. With no
    answer at all, falls back to `best_of_n(weights)`.
    """
    n = len(answers)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    ok = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool)
    totals: dict[str, float] = {}
    best: dict[str, int] = {}
    for i, a in enumerate(answers):
        key = _answer_key(a)
        if key is None or not ok[i]:
            continue
        totals[key] = totals.get(key, 0.0) + w[i]
        if key not in best or w[i] > w[best[key]]:
            best[key] = i
    if not totals:
        return best_of_n(w, ok)
    winner = max(totals, key=lambda k: totals[k])  # first maximum in insertion order
    return best[winner]


def select(
    method: str,
    scores: Sequence[float],
    answers: Sequence[str | None],
    eligible: Sequence[bool] | None = None,
) -> int:
    """The chosen candidate: "bon" (highest SPRM score), "majority" or "weighted" vote."""
    if method == "bon":
        return best_of_n(scores, eligible)
    if method == "majority":
        return vote(answers, None, eligible)
    if method == "weighted":
        return vote(answers, scores, eligible)
    raise ValueError(f"unknown selection {method!r}; choose one of {SELECTIONS}.")


# ------------------------------------------------------------------------------------ metrics
# Per problem p: correct[p] bools, scores[p] floats, answers[p] str | None, one per candidate
# (a [problems, k] array, or ragged lists when pruning left different numbers of candidates).


def pass_at_1(correct) -> float:
    """Mean correctness of single samples (over every candidate of every problem)."""
    return float(np.mean(np.concatenate([np.asarray(c, np.float64) for c in correct])))


def random_at_k(correct) -> float:
    """Expected accuracy of picking one of a problem's candidates uniformly at random."""
    return float(np.mean([np.mean(np.asarray(c, np.float64)) for c in correct]))


def bon_at_k(correct, scores) -> float:
    """Accuracy of the highest-scored candidate (Best-of-N by SPRM score)."""
    return float(np.mean([bool(c[best_of_n(s)]) for c, s in zip(correct, scores, strict=True)]))


def maj_at_k(correct, answers) -> float:
    """Accuracy of the majority answer."""
    return float(np.mean([bool(c[vote(a)]) for c, a in zip(correct, answers, strict=True)]))


def weighted_at_k(correct, answers, scores) -> float:
    """Accuracy of the SPRM-score-weighted vote."""
    picks = zip(correct, answers, scores, strict=True)
    return float(np.mean([bool(c[vote(a, s)]) for c, a, s in picks]))


# --------------------------------------------------------------------------------- candidates


@dataclasses.dataclass
class Candidate:
    """One response: text, generated ids, SPRM score and steps, finish reason, answer."""

    response: str
    tokens: list[int]
    score: float
    step_scores: list[float]
    step_positions: list[int]
    finish_reason: str
    answer: str | None

    @property
    def pruned(self) -> bool:
        return self.finish_reason == "pruned"


@dataclasses.dataclass
class Choice:
    """The k candidates of one prompt and the index chosen among them."""

    candidates: list[Candidate]
    chosen: int

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]


def candidates_from(
    result: SampleResult, decode: Callable[[list[int]], str], extract: Callable[[str], str | None]
) -> list[list[Candidate]]:
    """Groups a sampler result into [prompts][n] Candidates (decoding ids with `decode`)."""
    r = result.to_host()
    reasons = r.finish_reasons()
    out = []
    for p in range(len(r.lengths) // r.n):
        group = []
        for row in range(p * r.n, (p + 1) * r.n):
            ids = r.response(row)
            text = decode(ids)
            step_scores, positions = r.steps(row)
            group.append(
                Candidate(
                    response=text,
                    tokens=ids,
                    score=float(r.scores[row]),
                    step_scores=step_scores,
                    step_positions=positions,
                    finish_reason=reasons[row],
                    answer=None if reasons[row] == "pruned" else extract(text),
                )
            )
        out.append(group)
    return out


def generate_and_select(
    sampler: Sampler,
    params,
    prompts: Sequence[Sequence[int]],
    k: int,
    key: jax.Array,
    *,
    decode: Callable[[list[int]], str],
    extract: Callable[[str], str | None] | None = None,
    method: str = "bon",
    prompt_ids: Sequence[int] | None = None,
) -> list[Choice]:
    """Generates k candidates per prompt (pruned early when the sampler has a PruneRule) and
    chooses one per prompt with `method` ("bon", "majority" or "weighted").

    decode: token ids -> text; extract: text -> final answer (default: last \\boxed{});
    prompt_ids: passed to the sampler (randomness ids).
    """
    if extract is None:
        from msjax.rewards.math import extract_boxed as extract
    k = resolve_k(k=k)
    result = sampler(params, [list(p) for p in prompts], n=k, key=key, prompt_ids=prompt_ids)
    choices = []
    for group in candidates_from(result, decode, extract):
        eligible = [not c.pruned for c in group]
        chosen = select(method, [c.score for c in group], [c.answer for c in group], eligible)
        choices.append(Choice(group, chosen))
    return choices


def token_stats(choices: Sequence[Choice], max_new_tokens: int) -> dict[str, int]:
    """{"tokens_generated", "pruned" (candidates), "tokens_saved_max"}: the decode slots left to
    pruned candidates, an upper bound on what pruning saved (the exact saving needs the same
    run without pruning)."""
    cands = [c for ch in choices for c in ch.candidates]
    pruned = [c for c in cands if c.pruned]
    return {
        "tokens_generated": sum(len(c.tokens) for c in cands),
        "pruned": len(pruned),
        "tokens_saved_max": sum(max_new_tokens - len(c.tokens) for c in pruned),
    }
