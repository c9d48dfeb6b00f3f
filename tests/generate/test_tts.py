"""Mode resolution, Best-of-N, votes and the accuracy metrics on hand-worked cases."""

import numpy as np
import pytest

from msjax.generate.tts import (
    MODES,
    best_of_n,
    bon_at_k,
    maj_at_k,
    pass_at_1,
    random_at_k,
    resolve_k,
    select,
    vote,
    weighted_at_k,
)


def test_resolve_k():
    assert [resolve_k(m) for m in ("low", "medium", "high")] == [2, 8, 32] == list(MODES.values())
    assert resolve_k(k=5) == 5
    for kwargs, message in [
        (dict(mode="extreme"), "unknown mode"),
        (dict(k=0), ">= 1"),
        (dict(k=-3), ">= 1"),
        (dict(k=2.5), ">= 1"),
        (dict(mode="low", k=2), "not both"),
        ({}, "give a mode"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_k(**kwargs)


def test_selection_rules():
    answers = ["12", "7", " 12 ", "7", "7", None]
    scores = [0.9, 0.2, 0.8, 0.3, 0.1, 0.99]
    assert best_of_n(scores) == 5
    assert best_of_n(scores, eligible=[1, 1, 1, 1, 1, 0]) == 0
    assert vote(answers) == 1  # "7" wins 3-2; equal weights: its first candidate
    assert vote(answers, scores) == 0  # weighted: "12" 1.7 vs "7" 0.6
    assert vote(answers, eligible=[1, 0, 1, 0, 1, 1]) == 0  # "12" 2 vs "7" 1
    assert vote(["1", "2"]) == 0  # a tie goes to the answer seen first
    assert vote([None, None], [0.1, 0.4]) == 1  # no answers: best score
    assert vote(["\\dfrac{1}{2}", "\\frac{1}{2}", "3"]) == 0  # canonical forms agree
    assert select("bon", scores, answers) == 5
    assert select("majority", scores, answers) == 1
    assert select("weighted", scores, answers) == 0
    with pytest.raises(ValueError, match="unknown selection"):
        select("oracle", scores, answers)


def test_metrics():
    correct = np.array([[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
    answers = [["5", "4", "4", "3"], ["1", "1", "2", "2"], [None, "9", "9", None]]
    scores = [[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.1, 0.8], [0.5, 0.5, 0.5, 0.5]]
    assert pass_at_1(correct) == pytest.approx(3 / 12)
    assert random_at_k(correct) == pytest.approx((0.25 + 0.5 + 0) / 3)
    assert bon_at_k(correct, scores) == pytest.approx(1 / 3)  # picks 1, 3, 0
    assert maj_at_k(correct, answers) == pytest.approx(0.0)  # "4", "1" (first of a tie), "9"
    assert weighted_at_k(correct, answers, scores) == pytest.approx(1 / 3)  # "4", "2", "9"
