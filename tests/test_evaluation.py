"""msjax.evaluation: AUROC against a pairwise count, k-scaling on hand-worked groups, step joins."""

import math

import numpy as np
import pytest

from msjax.evaluation import (
    Candidates,
    roc_auc,
    scaling_metrics,
    step_scores_and_labels,
    within_problem_auroc,
)
from msjax.generate.tts import Candidate, Choice


def pairwise_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        scores = rng.integers(0, 5, n) / 4.0  # many ties
        labels = rng.random(n) < 0.4
        if labels.all() or not labels.any():
            continue
        assert roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels))
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    assert roc_auc([0.9, 0.1], [False, True]) == 0.0
    assert math.isnan(roc_auc([0.3, 0.4], [True, True]))
    with pytest.raises(ValueError, match="labels"):
        roc_auc([0.1, 0.2], [True])


def test_scaling_metrics_on_hand_worked_groups():
    # 2 problems x 4 candidates; k=2 uses groups (0,1) and (2,3).
    correct = np.array([[1, 0, 0, 1], [0, 0, 1, 0]], bool)
    scores = np.array([[0.2, 0.9, 0.3, 0.8], [0.5, 0.1, 0.7, 0.6]])
    answers = [["5", "4", "4", "5"], ["2", "2", "3", "2"]]
    m = scaling_metrics(correct, scores, answers, ks=(1, 2, 4))
    assert m["pass1"] == pytest.approx(3 / 8)
    # k=4: BoN picks 0.9 (wrong) and 0.7 (right); majority: "5"/"4" tie -> first seen "5"
    # (right), "2" (wrong); weighted: "5" 1.0 vs "4" 1.2 -> wrong, "2" 1.2 vs "3" 0.7 -> wrong.
    assert m["bon"]["4"] == pytest.approx(0.5)
    assert m["maj"]["4"] == pytest.approx(0.5)
    assert m["weighted"]["4"] == pytest.approx(0.0)
    assert m["random"]["4"] == pytest.approx(3 / 8)
    # k=2: problem 0 groups pick (0.9 wrong), (0.8 right); problem 1: (0.5 wrong), (0.7 right)
    assert m["bon"]["2"] == pytest.approx(0.5)
    # k=1 is every single candidate
    for name in ("bon", "maj", "weighted", "random"):
        assert m[name]["1"] == pytest.approx(3 / 8)
    # a pruned candidate is never chosen
    eligible = np.array([[1, 0, 1, 1], [1, 1, 1, 1]], bool)
    m = scaling_metrics(correct, scores, answers, ks=(4,), eligible=eligible)
    assert m["bon"]["4"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="divide"):
        scaling_metrics(correct, scores, answers, ks=(3,))


def _cand(score_steps, positions, pruned=False):
    return Candidate(
        response="",
        tokens=[1, 2, 3],
        score=0.5,
        step_scores=score_steps,
        step_positions=positions,
        finish_reason="pruned" if pruned else "eos",
        answer=None,
    )


def test_step_scores_join_labels_by_position():
    choices = [
        Choice([_cand([0.9, 0.2], [5, 9]), _cand([0.7], [5], pruned=True)], 0),
        Choice([_cand([0.4, 0.6], [4, 8])], 0),
    ]
    cands = Candidates(
        choices=choices,
        prompts=[[0], [0]],
        problems=["a", "b"],
        golds=["1", "2"],
        correct=np.zeros((2, 1), bool),
        scores=np.zeros((2, 1)),
        answers=[[None], [None]],
    )
    table = {"a": ([5, 9], [True, False]), "b": ([4, 12], [True, True])}

    def labeler(problem, prompt, tokens):
        pos, on = table[problem]
        return pos, {"on_track": on}

    s, labels, unmatched = step_scores_and_labels(cands, labeler)
    np.testing.assert_allclose(s, [0.9, 0.2, 0.4])  # position 8 has no label; pruned skipped
    np.testing.assert_array_equal(labels["on_track"], [True, False, True])
    assert unmatched == 2  # 8 scored without a label, 12 labelled without a score


def test_within_problem_auroc_ignores_single_class_problems():
    scores = [[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.4, 0.4, 0.4]]
    correct = [[1, 0, 0], [1, 0, 0], [1, 1, 1]]
    value, n = within_problem_auroc(scores, correct)
    assert n == 2 and value == pytest.approx((1.0 + 0.0) / 2)
    assert math.isnan(within_problem_auroc([[0.1]], [[1]])[0])
