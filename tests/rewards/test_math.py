"""Math outcome rewards: answer extraction (think span, multi-box runs, list golds), >= 40
equivalence cases, the worker pool path."""

import time

import numpy as np
import pytest

from msjax.rewards.math import (
    MathVerifier,
    answer_items,
    extract_boxed,
    fast_match,
    final_boxes,
    gold_items,
    math_reward,
)


def B(answer: str) -> str:
    return f"Thus the result is \\boxed{{{answer}}}."


# (response, gold, expected reward)
CASES = [
    # fractions and decimals
    (B("\\frac{1}{2}"), "0.5", 1),
    (B("\\dfrac{1}{2}"), "\\frac{1}{2}", 1),
    (B("\\tfrac12"), "1/2", 1),
    (B("0.50"), "\\frac{1}{2}", 1),
    (B("2/4"), "\\frac{1}{2}", 1),
    (B("-\\frac{3}{4}"), "-0.75", 1),
    (B("\\frac{-3}{4}"), "-\\frac34", 1),
    (B("\\frac{2}{3}"), "0.67", 0),
    (B("0.333"), "\\frac{1}{3}", 0),
    (B("1.5"), "1.50", 1),
    (B("3"), "3.0", 1),
    (B("3"), "4", 0),
    (B("1,000"), "1000", 1),
    (B("10^{3}"), "1000", 1),
    # roots
    (B("2\\sqrt{2}"), "\\sqrt{8}", 1),
    (B("\\sqrt{2}/2"), "\\frac{\\sqrt{2}}{2}", 1),
    (B("\\frac{1}{\\sqrt{2}}"), "\\frac{\\sqrt2}{2}", 1),
    (B("\\sqrt{3}"), "\\sqrt{2}", 0),
    # percent
    (B("50\\%"), "50", 1),
    (B("50\\%"), "0.5", 1),
    (B("12.5\\%"), "12.5", 1),
    (B("25\\%"), "50", 0),
    # intervals, tuples, sets
    (B("[1, 2)"), "[1,2)", 1),
    (B("(1,2)"), "[1,2]", 0),
    (B("(-\\infty, 3]"), "(-\\infty,3]", 1),
    (B("[0,1] \\cup [2,3]"), "[0,1]\\cup[2,3]", 1),
    (B("\\left( 1, 2 \\right)"), "(1,2)", 1),
    (B("(3, 2)"), "(2,3)", 0),
    (B("(1, -2, 3)"), "(1,-2,3)", 1),
    (B("\\{1,2,3\\}"), "\\{3,2,1\\}", 1),
    (B("\\{1,2\\}"), "\\{1,2,3\\}", 0),
    # text answers and choices
    (B("\\text{Monday}"), "Monday", 1),
    (B("Monday"), "Tuesday", 0),
    (B("Mondya"), "Monday", 0),  # a word is not a product of symbols
    (B("\\text{yes}"), "Yes", 1),
    (B("\\text{(B)}"), "B", 1),
    (B("(C)"), "B", 0),
    # units, degrees, money
    (B("5 \\text{ cm}"), "5", 1),
    (B("10\\text{ meters}"), "10", 1),
    (B("7 \\text{ cm}"), "5", 0),
    (B("30^\\circ"), "30", 1),
    (B("\\$5"), "5", 1),
    # expressions and constants
    (B("x = 3"), "3", 1),
    (B("2x+1"), "1+2x", 1),
    (B("\\frac{\\pi}{2}"), "\\dfrac{\\pi}{2}", 1),
    (B("\\pi"), "3.14159", 0),
    (B("\\infty"), "\\infty", 1),
    (B("-5"), "5", 0),
    (
        "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
        "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
        1,
    ),
    # several boxes (the last one counts), no box, nested braces, trailing punctuation
    ("First \\boxed{3}, but wait, it is \\boxed{4}", "4", 1),
    ("First \\boxed{4}, then \\boxed{3}", "4", 0),
    ("The answer is 4.", "4", 0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}2", 1),
    ("\\boxed{{5}}", "5", 1),
    ("\\boxed{5.}", "5", 1),
    ("\\boxed{ 5 ,}", "5", 1),
    ("$\\boxed{5}$.", "5", 1),
    ("\\fbox{12}", "12", 1),
    ("\\boxed 7", "7", 1),
    ("\\boxed{7", "7", 0),  # never closed
    ("\\boxed{32}", "\\boxed{32}", 1),  # a gold answer with its own box
    # a multi-box answer is graded as a whole; a list gold pairs off in any order
    ("\\boxed{2} and \\boxed{3}", "2, 3", 1),
    ("$\\boxed{3}$, $\\boxed{2}$.", "2, 3", 1),
    ("\\boxed{-1} \\text{ or } \\boxed{\\frac{1}{2}}", "0.5, -1", 1),
    ("\\boxed{2}\\quad\\boxed{3}", "\\boxed{3}, \\boxed{2}", 1),  # gold written as boxes
    ("\\boxed{2, 3}", "\\boxed{2} \\boxed{3}", 1),
    ("\\boxed{2} and \\boxed{3}", "2", 0),  # as a whole: not the gold's single value
    ("\\boxed{3} and \\boxed{2}", "2", 0),  # the old last-box rule gave 1
    ("\\boxed{2} and \\boxed{4}", "2, 3", 0),
    ("\\boxed{2}, \\boxed{2}", "2, 3", 0),  # one-to-one: 2 cannot stand for 3
    ("\\boxed{2}, \\boxed{3}, \\boxed{4}", "3, 4", 0),
    ("\\boxed{2}", "2, 3", 0),
    ("\\boxed{(1, 2)}", "(1,2)", 1),  # a tuple is one item
    ("\\boxed{(2, 1)}", "(1,2)", 0),
    ("\\boxed{1,000}", "\\boxed{1000}", 1),  # a thousands comma does not split
    # only the text after </think> is graded; an unclosed think span has no answer
    ("<think>\nso \\boxed{5}.\n\n</think>\n\nThe answer is \\boxed{4}.", "4", 1),
    ("<think>\nso \\boxed{4}.\n\n</think>\n\nThe answer is \\boxed{5}.", "4", 0),
    ("<think>\nso \\boxed{4}.\n\n</think>\n\nThe answer is 4.", "4", 0),
    ("<think>\nso \\boxed{4}.\n\nBut", "4", 0),  # truncated while thinking
    ("so \\boxed{4}.\n\n</think>\n\n\\boxed{4}", "4", 1),  # <think> was in the prompt
]


def test_at_least_40_cases():
    assert len(CASES) >= 40
    assert sum(e for *_, e in CASES) >= 20 and sum(1 - e for *_, e in CASES) >= 15


@pytest.mark.parametrize("response, gold, expected", CASES)
def test_math_reward_cases(response, gold, expected):
    assert math_reward(response, gold) == float(expected)


def test_extract_boxed():
    assert extract_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces do not nest
    assert extract_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert extract_boxed("\\fbox{x}") == "x"
    assert extract_boxed("\\boxed 42$") == "42"
    assert extract_boxed("\\boxed{1} then \\boxed{2") is None  # the last box never closes
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxedfoo{1}") is None


def test_a_think_span_opened_in_the_prompt_needs_its_end():
    thinking = "so \\boxed{4}.\n\nand more"
    assert math_reward(thinking, "4") == 1.0  # no think tags anywhere: the whole response
    assert math_reward(thinking, "4", prompt="Q\n<think>\n") == 0.0  # still thinking
    assert math_reward(thinking + "</think>\\boxed{4}", "4", prompt="Q\n<think>\n") == 1.0


def test_answer_items_and_final_boxes():
    assert final_boxes("First \\boxed{3}, but wait, it is \\boxed{4}") == ["4"]
    assert final_boxes("$\\boxed{2}$, $\\boxed{3}$ and \\boxed{4}.") == ["2", "3", "4"]
    assert final_boxes("\\boxed{2} \\text{ and } \\boxed{3}") == ["2", "3"]
    assert final_boxes("\\boxed{2} then \\boxed{3") == []  # the last box never closes
    assert final_boxes("\\boxed{\\boxed{5}}") == ["5"]
    assert answer_items("(1, 2), [3,4), \\{5,6\\}") == ["(1, 2)", "[3,4)", "\\{5,6\\}"]
    assert answer_items("1,000,000") == ["1,000,000"]
    assert answer_items("10,20, 3,") == ["10", "20", "3"]
    assert gold_items("\\boxed{2}, \\boxed{3, 4}") == ["2", "3", "4"]
    assert gold_items("7") == ["7"]


def test_fast_path_decides_plain_numbers_and_words():
    assert fast_match("32", "32") is True
    assert fast_match("32", "33") is False
    assert fast_match("0.5", ".50") is True
    assert fast_match("\\text{Even}", "even") is True
    assert fast_match("\\frac{1}{2}", "0.5") is None  # left to math-verify


def _sleepy_compare(pred, gold, timeout_s):
    """A toy comparison (same characters) that hangs on "hang" (stands for a stuck math-verify)."""
    if "hang" in pred:
        time.sleep(3600)
    return sorted(pred) == sorted(gold)


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2, timeout_s=20.0) as v:
        yield v


def test_verify_batch_matches_single_item_rewards(verifier):
    responses = [r for r, _, _ in CASES]
    golds = [g for _, g, _ in CASES]
    rewards = verifier.verify_batch(responses, golds)
    assert rewards.dtype == np.float32
    np.testing.assert_array_equal(rewards, [float(e) for *_, e in CASES])
    c = verifier.counters()
    assert c["items"] == len(CASES) and c["verified"] > 10 and c["fast"] > 10
    # prompts say whether a think span is open: then only an answer after </think> counts
    thinking = ["so \\boxed{2}", "so \\boxed{2}</think>\\boxed{2}"]
    with_prompts = verifier.verify_batch(thinking, ["2", "2"], prompts=["Q<think>\n"] * 2)
    np.testing.assert_array_equal(with_prompts, [0.0, 1.0])


def test_pathological_answer_finishes_within_timeout():
    # math-verify's own timeout off: only the pool's per-item timeout can stop it.
    with MathVerifier(num_workers=1, timeout_s=2.0, math_verify_timeout_s=None) as v:
        rewards = v.verify_batch([B("9^{9^{9^{9}}}"), B("\\frac{1}{2}")], ["1", "0.5"])
        np.testing.assert_array_equal(rewards, [0.0, 1.0])


def test_hung_worker_is_replaced_and_counted():
    with MathVerifier(num_workers=1, timeout_s=1.0, compare_fn=_sleepy_compare) as v:
        # None of these is decided by the fast path, so all go to the workers.
        responses = [B("hang+1"), B("a+b"), B("hang-2"), B("a-b"), B("p*q")]
        golds = ["1+hang", "b+a", "x", "b+a", "x"]
        rewards = v.verify_batch(responses, golds)
        np.testing.assert_allclose(rewards, [0.0, 1.0, 0.0, 0.0, 0.0])  # a timed-out item is wrong
        c = v.counters()
        assert (c["verified"], c["timeouts"], c["replaced"], c["errors"]) == (5, 2, 2, 0)
        np.testing.assert_array_equal(v.verify_batch([B("c*d")], ["d*c"]), [1.0])


def test_bad_batch_arguments():
    v = MathVerifier(num_workers=1)
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        v.verify_batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="1 responses but 2 prompts"):
        v.verify_batch(["a"], ["a"], prompts=["p", "q"])
    with pytest.raises(ValueError, match="unknown reward 'exact'"):
        MathVerifier(reward="exact")
    with pytest.raises(ValueError, match="unknown reward manager 'dapo'"):
        MathVerifier(reward="official", manager="dapo")
    v.close()
