"""Evaluation of a reflective model: sampled candidates, test-time-scaling curves, SPRM AUROC.

    cands = sample_candidates(sampler, params, tokenizer, prompts, golds, k=32, key=key)
    curves = scaling_metrics(cands.correct, cands.scores, cands.answers, ks=(2, 8, 32))
    per = per_problem_accuracy(cands.correct, cands.scores, cands.answers, ks=(1, 2, 4, 8))
    k_curve(per)                                  # {method: {k: [accuracy, low, high]}}, 95% CI
    roc_auc(cands.scores.ravel(), cands.correct.ravel())        # trajectory-level AUROC

`scaling_metrics` estimates accuracy at k from k_max candidates per problem by cutting them into
k_max // k disjoint groups of k and averaging over groups (lower variance than one group; the
candidates are i.i.d. samples, so each group is an honest draw of k). The selection rules are
those of `msjax.generate.tts`. Confidence intervals are percentile bootstraps over problems (and
over runs, e.g. seeds of the whole pipeline, when several are stacked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from msjax.generate import tts
from msjax.progress import progress as progress_bar
from msjax.rewards.math import math_reward


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (ties count one half); NaN when
    one class is empty. Equals the Mann-Whitney U statistic / (n_pos * n_neg)."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: {s.shape[0]} scores but {y.shape[0]} labels.")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average ranks (1-based) over runs of equal scores
    edges = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(s)]])
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def within_problem_auroc(scores, correct) -> tuple[float, int]:
    """Mean AUROC of the candidates of ONE problem (what Best-of-N needs: ranking a problem's
    own candidates), over the problems that have both correct and wrong candidates; returns
    (mean AUROC or NaN, number of such problems). scores, correct: [P, k]."""
    values = [
        roc_auc(s, c)
        for s, c in zip(np.asarray(scores), np.asarray(correct, bool), strict=True)
        if c.any() and not c.all()
    ]
    return (float(np.mean(values)) if values else float("nan")), len(values)


# --- the original's metric: candidates pooled over runs, Best-of-N over disjoint groups --------


@dataclasses.dataclass
class PooledProblem:
    """One problem's candidates from every run: key (its prompt), gold answer, and per candidate
    in run order: correct (bool) and score (the SPRM trajectory score; -inf for a candidate that
    must not be chosen while its group has another, e.g. a pruned one)."""

    key: str
    gold: str
    correct: list[bool]
    scores: list[float]


def pool_candidates(
    rows: Iterable[tuple[str, str, Sequence[bool], Sequence[float]]],
) -> list[PooledProblem]:
    """Joins the candidates of rows with the same key, in row order (files, then lines), as the
    original's metric pools its run files by prompt; problems come in first-seen order.

    rows: (key, gold, correct per candidate, score per candidate). Returns list[PooledProblem].
    A row whose lists differ in length, or whose gold differs from the key's first row, raises
    ValueError naming the key.
    """
    pooled: dict[str, PooledProblem] = {}
    for key, gold, correct, scores in rows:
        if len(correct) != len(scores):
            raise ValueError(
                f"problem {key[:80]!r}: {len(correct)} correctness flags but {len(scores)} "
                "scores in one row; each candidate needs both."
            )
        p = pooled.setdefault(key, PooledProblem(key, str(gold), [], []))
        if p.gold != str(gold):
            raise ValueError(
                f"problem {key[:80]!r} has gold answer {p.gold!r} in one row and {gold!r} in "
                "another; pool runs of the same data file."
            )
        p.correct += [bool(c) for c in correct]
        p.scores += [float(s) for s in scores]
    return list(pooled.values())


def pooled_best_of_n(problems: Sequence[PooledProblem], n: int) -> dict[str, Any]:
    """The original's Best-of-N accuracy over pooled candidates.

    K = (fewest candidates of any problem) // n disjoint groups; group i takes candidates
    [i*n, (i+1)*n) of every problem and picks, per problem, the FIRST highest score; a group's
    accuracy is the fraction of problems whose pick is correct; the result is the mean over the
    K groups. A score of -inf is never picked while its group has a finite one.
    Returns {"accuracy", "n", "groups": K, "problems", "per_group": [K accuracies]}.
    """
    if not problems:
        raise ValueError("pooled_best_of_n: no problems.")
    if n < 1:
        raise ValueError(f"pooled_best_of_n: n={n} must be >= 1.")
    fewest = min(problems, key=lambda p: len(p.scores))
    groups = len(fewest.scores) // n
    if groups < 1:
        raise ValueError(
            f"problem {fewest.key[:80]!r} has {len(fewest.scores)} candidates, fewer than "
            f"n={n}; run more samples (or more runs) of it."
        )
    for p in problems:
        if np.any(np.isnan(p.scores) | np.isposinf(p.scores)):
            raise ValueError(f"problem {p.key[:80]!r} has a NaN or +inf score.")
    per_group = []
    for g in range(groups):
        picks = [p.correct[g * n + tts.best_of_n(p.scores[g * n : (g + 1) * n])] for p in problems]
        per_group.append(float(np.mean(picks)))
    return {
        "accuracy": float(np.mean(per_group)),
        "n": n,
        "groups": groups,
        "problems": len(problems),
        "per_group": per_group,
    }


@dataclasses.dataclass
class Candidates:
    """k sampled candidates for each of P problems.

    choices: the tts Choices (responses, tokens, SPRM scores, steps, finish reasons);
    prompts: the prompt ids; problems / golds: per problem; correct: bool[P, k];
    scores: f32[P, k] trajectory scores; answers: [P][k] extracted answers (None: no answer).
    """

    choices: list[tts.Choice]
    prompts: list[list[int]]
    problems: list[str]
    golds: list[str]
    correct: np.ndarray
    scores: np.ndarray
    answers: list[list[str | None]]

    @property
    def tokens_generated(self) -> int:
        return sum(len(c.tokens) for ch in self.choices for c in ch.candidates)

    @property
    def lengths(self) -> np.ndarray:
        """int[P, k]: generated tokens of each candidate (up to its pruning, if pruned)."""
        return np.asarray([[len(c.tokens) for c in ch.candidates] for ch in self.choices], int)

    @property
    def eligible(self) -> np.ndarray:
        """bool[P, k]: candidates that were not pruned."""
        return np.asarray([[not c.pruned for c in ch.candidates] for ch in self.choices], bool)


def sample_candidates(
    sampler,
    params,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    golds: Sequence[str],
    *,
    k: int,
    key: jax.Array,
    batch_size: int = 64,
    problems: Sequence[str] | None = None,
    grade: Callable[..., float] = math_reward,
    progress: bool = False,
) -> Candidates:
    """k candidates per prompt from `sampler` (its config decides temperature, pruning, ...),
    graded against `golds` with `grade(response, gold, prompt=prompt text) -> reward` (correct
    when > 0.5; pruned candidates count as wrong; the prompt says whether it opened a think
    span, as `math_reward` reads it). Prompt p gets randomness id p, so the result does not
    depend on batch_size and two samplers that differ only in pruning draw the same tokens."""
    prompts = [list(p) for p in prompts]
    if len(prompts) != len(golds):
        raise ValueError(f"{len(prompts)} prompts but {len(golds)} gold answers.")
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    choices: list[tts.Choice] = []
    bar = progress_bar(
        total=len(prompts), desc=f"sample k={k}", unit="problem", enabled=progress, leave=False
    )
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        fill = batch_size - len(chunk) if len(prompts) > batch_size else 0
        ids = list(range(lo, lo + len(chunk))) + list(range(len(prompts), len(prompts) + fill))
        out = tts.generate_and_select(
            sampler,
            params,
            chunk + [chunk[0]] * fill,
            k,
            key,
            decode=decode,
            prompt_ids=ids,
        )
        choices.extend(out[: len(chunk)])
        bar.update(len(chunk))
    bar.close()
    texts = [tokenizer.decode(p) for p in prompts]  # special tokens kept: <think> shows
    correct = np.asarray(
        [
            [not c.pruned and grade(c.response, str(g), prompt=t) > 0.5 for c in ch.candidates]
            for ch, g, t in zip(choices, golds, texts, strict=True)
        ],
        bool,
    )
    scores = np.asarray([[c.score for c in ch.candidates] for ch in choices], np.float32)
    answers = [[c.answer for c in ch.candidates] for ch in choices]
    return Candidates(
        choices=choices,
        prompts=prompts,
        problems=list(problems) if problems is not None else [""] * len(prompts),
        golds=[str(g) for g in golds],
        correct=correct,
        scores=scores,
        answers=answers,
    )


METHODS = ("bon", "maj", "weighted", "random")


def default_ks(k_max: int) -> list[int]:
    """The powers of two that divide k_max (1, 2, 4, ..., k_max for a power of two)."""
    return [k for k in (2**i for i in range(k_max.bit_length())) if k_max % k == 0]


def per_problem_accuracy(
    correct,
    scores,
    answers: Sequence[Sequence[str | None]],
    ks: Sequence[int],
    eligible=None,
) -> dict[str, dict[int, np.ndarray]]:
    """Each problem's accuracy at each k of Best-of-N by SPRM ("bon"), majority vote ("maj"),
    SPRM-weighted vote ("weighted") and a uniformly random pick ("random").

    correct, scores: [P, k_max]; answers: [P][k_max]; eligible: optional bool[P, k_max] (pruned
    candidates are never selected; a group with none left counts as wrong). Each k must divide
    k_max; a problem's accuracy at k is the mean over its k_max // k disjoint groups of k.
    Returns {method: {k: f64[P]}}.
    """
    correct = np.asarray(correct, bool)
    scores = np.asarray(scores, np.float64)
    p, k_max = correct.shape
    ok = np.ones_like(correct) if eligible is None else np.asarray(eligible, bool)
    out: dict[str, dict[int, np.ndarray]] = {name: {} for name in METHODS}
    for k in ks:
        if k < 1 or k_max % k:
            raise ValueError(f"k={k} must divide the {k_max} candidates per problem.")
        acc = np.zeros((len(METHODS), p, k_max // k))
        for g in range(k_max // k):
            cols = slice(g * k, (g + 1) * k)
            for i in range(p):
                c, s, e = correct[i, cols], scores[i, cols], ok[i, cols]
                if not e.any():
                    continue
                a = list(answers[i][cols])
                acc[:, i, g] = (
                    c[tts.best_of_n(s, e)],
                    c[tts.vote(a, None, e)],
                    c[tts.vote(a, s, e)],
                    np.mean(c),
                )
        for name, values in zip(METHODS, acc.mean(axis=2), strict=True):
            out[name][k] = values
    return out


def scaling_metrics(
    correct,
    scores,
    answers: Sequence[Sequence[str | None]],
    ks: Sequence[int],
    eligible=None,
) -> dict[str, dict[str, float]]:
    """Accuracy at each k of the `per_problem_accuracy` methods (mean over problems), plus
    "pass1" (one sample). Returns {"pass1": float, "bon": {str(k): acc}, "maj": ..., ...}."""
    per = per_problem_accuracy(correct, scores, answers, ks, eligible)
    out: dict = {"pass1": tts.pass_at_1(np.asarray(correct, bool))}
    for name, by_k in per.items():
        out[name] = {str(k): float(np.mean(v)) for k, v in by_k.items()}
    return out


def bootstrap_ci(
    values, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> list[float]:
    """[mean, low, high]: the mean of `values` with a percentile-bootstrap confidence interval.

    values: f[P] (one run over P problems) or f[S, P] (S runs, e.g. seeds, over the SAME P
    problems). Each resample draws P problems with replacement (the same draw for every run)
    and, for S > 1, S runs with replacement, so the interval covers both sources of variation.
    """
    v = np.asarray(values, np.float64)
    v = v[None] if v.ndim == 1 else v
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"bootstrap_ci: values must be f[P] or f[S, P], got shape {v.shape}.")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level={level} must be in (0, 1).")
    s, p = v.shape
    rng = np.random.default_rng(seed)
    problems = rng.integers(0, p, (resamples, p))
    runs = rng.integers(0, s, (resamples, s)) if s > 1 else np.zeros((resamples, 1), int)
    means = v[runs[:, :, None], problems[:, None, :]].mean(axis=(1, 2))
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(v.mean()), float(low), float(high)]


def k_curve(per_problem: dict[str, dict[int, np.ndarray]], **ci) -> dict[str, dict[str, list]]:
    """{method: {str(k): [accuracy, low, high]}} from `per_problem_accuracy` values (f[P] or,
    stacked over runs, f[S, P]); `ci` goes to `bootstrap_ci` (level, resamples, seed)."""
    return {
        name: {str(k): bootstrap_ci(v, **ci) for k, v in sorted(by_k.items())}
        for name, by_k in per_problem.items()
    }


def separation_step(
    steps: Sequence[int], correct, wrong, *, margin: float = 0.1, window: int = 5
) -> int | None:
    """The first step from which the trailing mean (over the last `window` logged steps) of
    correct - wrong stays >= `margin` to the end of the run; None when it never does. NaN
    entries (a step without wrong or correct samples) are left out of the means, and a step
    whose whole window is NaN is not judged.

    steps: the logged steps (ascending); correct, wrong: f[len(steps)] mean scores.
    """
    gap = np.asarray(correct, np.float64) - np.asarray(wrong, np.float64)
    if gap.shape != (len(steps),):
        raise ValueError(f"separation_step: {len(steps)} steps but gap of shape {gap.shape}.")
    smooth = np.full(len(gap), np.nan)
    for i in range(len(gap)):
        recent = gap[max(0, i - window + 1) : i + 1]
        if np.isfinite(recent).any():
            smooth[i] = np.nanmean(recent)
    logged = np.flatnonzero(np.isfinite(smooth))  # steps with a mean to judge
    above = smooth[logged] >= margin
    if not above.size or not above[-1]:
        return None
    below = np.flatnonzero(~above)
    return int(steps[logged[below[-1] + 1 if below.size else 0]])


def step_scores_and_labels(
    cands: Candidates,
    labeler: Callable[[str, list[int], list[int]], tuple[Sequence[int], dict[str, Sequence[bool]]]],
) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Every scored step of every candidate with its true labels.

    labeler(problem, prompt_ids, response_ids) -> (positions, {label name: bools}) gives the
    labelled steps of one response in prompt+response coordinates (for the synthetic task:
    `msjax.data.token_step_labels`). Steps are joined with the sampler's streamed step positions;
    a scored step without a label (or the reverse) is counted and left out.
    Returns (step scores f32[n], {name: bool[n]}, unmatched count).
    """
    scores: list[float] = []
    labels: dict[str, list[bool]] = {}
    unmatched = 0
    for ch, prompt, problem in zip(cands.choices, cands.prompts, cands.problems, strict=True):
        for c in ch.candidates:
            if c.pruned:
                continue
            positions, named = labeler(problem, prompt, c.tokens)
            by_pos = {int(p): i for i, p in enumerate(positions)}
            unmatched += len(set(by_pos) ^ set(c.step_positions))
            for s, p in zip(c.step_scores, c.step_positions, strict=True):
                i = by_pos.get(int(p))
                if i is None:
                    continue
                scores.append(float(s))
                for name, values in named.items():
                    labels.setdefault(name, []).append(bool(values[i]))
    return (
        np.asarray(scores, np.float32),
        {k: np.asarray(v, bool) for k, v in labels.items()},
        unmatched,
    )
