"""msjax.evaluation's k-curve helpers: per-problem selection against a plain re-statement of the
rules, bootstrap intervals against the normal approximation, the "aha" separation step."""

import math
from collections import Counter

import numpy as np
import pytest

from msjax.evaluation import (
    bootstrap_ci,
    default_ks,
    k_curve,
    per_problem_accuracy,
    scaling_metrics,
    separation_step,
)


def plain_selection(correct, scores, answers, eligible):
    """One group: (bon, majority, weighted, random) correctness, restated with plain Python."""
    idx = [i for i in range(len(correct)) if eligible[i]]
    if not idx:  # every candidate pruned: no answer, wrong for every method
        return 0.0, 0.0, 0.0, 0.0
    bon = max(idx, key=lambda i: (scores[i], -i))  # highest score, first on ties

    def vote(weight):
        totals, order = Counter(), []
        for i in idx:
            if answers[i] is None:
                continue
            if answers[i] not in totals:
                order.append(answers[i])
            totals[answers[i]] += weight(i)
        if not order:
            return bon
        best = max(order, key=lambda a: (totals[a], -order.index(a)))
        return max((i for i in idx if answers[i] == best), key=lambda i: (weight(i), -i))

    maj = vote(lambda i: 1.0)
    weighted = vote(lambda i: scores[i])
    return (
        float(correct[bon]),
        float(correct[maj]),
        float(correct[weighted]),
        float(np.mean(correct)),
    )


def test_per_problem_accuracy_matches_a_plain_restatement():
    rng = np.random.default_rng(0)
    p, k_max = 12, 8
    answers = [[None if rng.random() < 0.1 else str(rng.integers(4)) for _ in range(k_max)]
               for _ in range(p)]  # fmt: skip
    correct = np.array([[a == "0" for a in row] for row in answers])
    scores = rng.integers(0, 6, (p, k_max)) / 5.0  # ties
    eligible = rng.random((p, k_max)) < 0.8
    ks = default_ks(k_max)
    assert ks == [1, 2, 4, 8]
    per = per_problem_accuracy(correct, scores, answers, ks, eligible)
    for k in ks:
        for i in range(p):
            groups = [
                plain_selection(
                    correct[i, g : g + k], scores[i, g : g + k], answers[i][g : g + k],
                    eligible[i, g : g + k],
                )
                for g in range(0, k_max, k)
            ]  # fmt: skip
            want = np.mean(groups, axis=0)
            got = [per[name][k][i] for name in ("bon", "maj", "weighted", "random")]
            np.testing.assert_allclose(got, want, err_msg=f"problem {i}, k={k}")
    # scaling_metrics is the mean over problems of the same values
    m = scaling_metrics(correct, scores, answers, ks, eligible)
    assert m["maj"]["4"] == pytest.approx(np.mean(per["maj"][4]))


def test_default_ks():
    assert default_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ks(24) == [1, 2, 4, 8]
    assert default_ks(1) == [1]


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    values = (rng.random(2000) < 0.4).astype(float)
    mean, low, high = bootstrap_ci(values, resamples=2000)
    half = 1.959964 * values.std() / math.sqrt(len(values))
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(mean - half, abs=0.004)
    assert high == pytest.approx(mean + half, abs=0.004)
    # 90% is narrower; constant values have a zero-width interval
    _, low90, high90 = bootstrap_ci(values, level=0.9, resamples=2000)
    assert high90 - low90 < high - low
    assert bootstrap_ci(np.full(10, 0.25)) == pytest.approx([0.25, 0.25, 0.25])
    with pytest.raises(ValueError, match="shape"):
        bootstrap_ci(np.zeros((2, 3, 4)))


def test_bootstrap_over_runs_adds_the_run_to_run_spread():
    rng = np.random.default_rng(2)
    problems = rng.random(300)
    # three runs over the same problems that differ by a constant offset per run
    runs = np.stack([problems + d for d in (-0.1, 0.0, 0.1)])
    mean, low, high = bootstrap_ci(runs, resamples=3000)
    _, low1, high1 = bootstrap_ci(problems, resamples=3000)
    assert mean == pytest.approx(problems.mean())
    assert high - low > (high1 - low1) + 0.05  # the offsets' spread is in the interval
    # the runs' share alone: the mean of 3 offsets drawn from {-0.1, 0, 0.1} spans about
    # +-0.1 * 1.96 * sqrt(2/3) / sqrt(3)
    assert high - low == pytest.approx(2 * 0.1 * 1.96 * math.sqrt(2 / 9), abs=0.04)


def test_k_curve_reports_accuracy_and_interval_per_method_and_k():
    per = {"bon": {1: np.array([0.0, 1.0, 1.0, 1.0]), 4: np.array([1.0, 1.0, 1.0, 1.0])}}
    curve = k_curve(per, resamples=500)
    assert list(curve["bon"]) == ["1", "4"]
    acc, low, high = curve["bon"]["1"]
    assert acc == 0.75 and 0.0 <= low <= acc <= high <= 1.0
    assert curve["bon"]["4"] == [1.0, 1.0, 1.0]


def test_separation_step_on_hand_worked_curves():
    steps = [1, 2, 3, 4, 5, 6]
    # gap 0, 0, 0.25, 0.3, 0.3, 0.3: with window 1 it stays >= 0.1 from step 3
    correct = [0.5, 0.5, 0.75, 0.8, 0.8, 0.8]
    wrong = [0.5] * 6
    assert separation_step(steps, correct, wrong, window=1) == 3
    # trailing mean over 2: 0, 0, 0.125, 0.275, ... -> from step 3; over 3: 0.083 at step 3
    assert separation_step(steps, correct, wrong, window=2) == 3
    assert separation_step(steps, correct, wrong, window=3) == 4
    # separated from the start
    assert separation_step(steps, [0.9] * 6, wrong) == 1
    # separated, then merged again at the end: no lasting separation
    assert separation_step(steps, [*correct[:-1], 0.5], wrong, window=1) is None
    # a step without wrong rollouts (NaN) does not break the run
    nan_wrong = [0.5, 0.5, 0.5, math.nan, 0.5, 0.5]
    assert separation_step(steps, correct, nan_wrong, window=1) == 3
    with pytest.raises(ValueError, match="steps"):
        separation_step([1, 2], [0.1], [0.2])
