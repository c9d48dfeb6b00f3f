"""C-Eval letter grading: the original's regex (first match, either colon, any case)."""

import pytest

from msjax.rewards import ceval_letter, ceval_reward


@pytest.mark.parametrize(
    "text, letter",
    [
        ("答案：B", "b"),
        ("答案: c.", "c"),
        ("The answer: D", "d"),
        ("ANSWER :a", "a"),
        ("answer:\n B", "b"),  # \s spans newlines
        ("答案是B", None),  # no colon
        ("answer: E", None),  # not a C-Eval letter
        ("答案：A ... 答案：C", "a"),  # the first match counts
        ("分析：略。", None),
    ],
)
def test_letter(text, letter):
    assert ceval_letter(text) == letter


def test_reward_compares_lower_case_letters():
    assert ceval_reward("推理……\n答案：B", "B") == 1.0
    assert ceval_reward("推理……\n答案：B", " b ") == 1.0
    assert ceval_reward("推理……\n答案：B", "C") == 0.0
    assert ceval_reward("no letter", "A") == 0.0
