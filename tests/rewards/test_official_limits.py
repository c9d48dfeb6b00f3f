"""`official_reward` on pathological input: huge texts, deep braces, 10k boxes, invalid LaTeX,
an answer whose normalisation runs for minutes, bad types, and calls from a daemonic process.
Values are derived from the rule by hand (the gold is "7"; only the texts valued 1 hold a 7)."""

import multiprocessing as mp

import numpy as np
import pytest

from msjax.rewards import MathVerifier, official_reward
from msjax.rewards.official import _shared_verifier

EOS = "<｜end▁of▁sentence｜>"
R1 = "<｜begin▁of▁sentence｜><｜User｜>Find x.<｜Assistant｜><think>\n"
THINK = "Step.\n\n</think>\n\n"
TIMEOUT_S = 2.0

# (id, text, manager, value)
PATHOLOGICAL = [
    # 350k characters of steps, then a 210k-character tail (no box: the tail is the prediction)
    # with lone surrogates and NULs, which travel to the worker process intact
    ("huge", R1 + "Step.\n\n" * 50_000 + "</think>" + "x\ud800\x00" * 70_000 + EOS, "naive", 0.0),
    # a box that never closes: no box, the whole tail is the prediction
    ("open_braces", R1 + THINK + "\\boxed{" + "{" * 100_000 + "x" + EOS, "naive", 0.0),
    (
        "deep_braces",
        R1 + THINK + "\\boxed{" + "{" * 50_000 + "x" + "}" * 50_001 + EOS,
        "naive",
        0.0,
    ),
    (
        "10k_boxes_last_right",
        R1 + THINK + "\\boxed{x} " * 10_000 + "\\boxed{7}" + EOS,
        "naive",
        1.0,
    ),
    (
        "10k_boxes_last_wrong",
        R1 + THINK + "\\boxed{7} " * 10_000 + "\\boxed{x}" + EOS,
        "naive",
        0.0,
    ),
    (
        "invalid_latex",
        R1 + THINK + "\\boxed{\\frac{\\sqrt{}}{}\\begin{pmatrix}x}" + EOS,
        "naive",
        0.0,
    ),
    # 100k `</think>`: the naive format check fails; prime grades the text after the last one
    ("100k_think_ends", R1 + "</think>" * 100_000 + "7" + EOS, "naive", 0.0),
    ("100k_think_ends_prime", "</think>" * 100_000 + "7", "prime", 1.0),
]
# The original's regexes are quadratic here (minutes): the worker times out, the answer is
# wrong, and without the EOS literal a wrong answer is worth 0.1.
QUADRATIC = R1 + THINK + "oxed{" * 100_000


@pytest.mark.parametrize(
    "text, manager, value", [c[1:] for c in PATHOLOGICAL], ids=[c[0] for c in PATHOLOGICAL]
)
def test_pathological_inputs_get_the_rule_value(text, manager, value):
    assert official_reward(text, "7", manager=manager, timeout_s=TIMEOUT_S) == value


def test_an_answer_that_runs_for_minutes_times_out_as_wrong():
    before = _shared_verifier("naive", TIMEOUT_S).counters()["timeouts"]
    assert official_reward(QUADRATIC, "7", timeout_s=TIMEOUT_S) == 0.1
    assert _shared_verifier("naive", TIMEOUT_S).counters()["timeouts"] == before + 1
    # the replaced worker grades the next answer (math-verify: 0.5 = 1/2)
    assert official_reward(R1 + THINK + "\\boxed{0.5}", "\\frac{1}{2}", timeout_s=TIMEOUT_S) == 1.0


@pytest.mark.parametrize("gold", [7, 7.0, np.int64(7), "7"])
def test_numeric_gold_is_its_string(gold):
    assert official_reward(R1 + THINK + "\\boxed{7}" + EOS, gold) == 1.0


@pytest.mark.parametrize(
    "text, gold, match",
    [
        (R1 + THINK + "7", None, "gold answer must be a string or a number, got NoneType"),
        (R1 + THINK + "7", {"target": "7"}, "got dict .*pass its 'target'"),
        (R1 + THINK + "7", ["7"], "got list"),
        ((R1 + THINK + "7").encode(), "7", "must be a decoded str, got bytes"),
    ],
)
def test_bad_types_are_refused_clearly(text, gold, match):
    with pytest.raises(TypeError, match=match):
        official_reward(text, gold)


def test_verify_batch_names_the_bad_row():
    with MathVerifier(num_workers=1, reward="official") as v:
        with pytest.raises(TypeError, match="row 1: the gold answer .* got NoneType"):
            v.verify_batch([R1 + THINK + "7", R1 + THINK + "7"], ["7", None])
        assert v.counters()["items"] == 0  # nothing graded


def _grade(args):
    text, gold = args
    return official_reward(text, gold)


def test_a_daemonic_process_grades_in_itself():
    # A multiprocessing.Pool worker cannot start the grading worker: it grades in itself.
    items = [
        (R1 + THINK + "\\boxed{7}" + EOS, "7"),
        (R1 + THINK + "\\boxed{0.5}", "\\frac{1}{2}"),  # math-verify decides
        (R1 + THINK + "\\boxed{8}", "7"),
    ]
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.map(_grade, items) == [1.0, 1.0, 0.1]
