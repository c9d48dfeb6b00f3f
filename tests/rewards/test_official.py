"""The `official` reward against a separate plain re-statement of the original rule
(official_reference.py) on hand-made responses, hand-derived values, seeded random texts, and the
worker-pool path."""

import random

import numpy as np
import pytest
from official_reference import final_norm, reference_reward, strip_v2

from msjax.rewards import MathVerifier, official_reward
from msjax.rewards.normalize import final_answer_form, math_normal_form

EOS = "<｜end▁of▁sentence｜>"
R1 = (
    "<｜begin▁of▁sentence｜><｜User｜>Find x. Let's think step by step and output the final "
    "answer within \\boxed{}.<｜Assistant｜><think>\n"
)
CHATML = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nFind x."
    "<|im_end|>\n<|im_start|>assistant\n<think>\n"
)
PLAIN = "User: Find x.\nAssistant: <think>\n"
THINK = "First, 2 + 3 = 5.\n\nSo x = 5.\n\n</think>\n\n"


def r1(answer, eos=True):
    return R1 + THINK + answer + (EOS if eos else "")


# (text, gold, manager, value derived by hand from the rule, or None: math-verify decides)
CASES = [
    # the plain cases: right / wrong, EOS / no EOS
    (r1("The answer is \\boxed{5}."), "5", "naive", 1.0),
    (r1("The answer is \\boxed{6}."), "5", "naive", 0.0),
    (r1("The answer is \\boxed{6}.", eos=False), "5", "naive", 0.1),
    (r1("The answer is \\boxed{5}.", eos=False), "5", "naive", 1.0),
    # no </think>: 0, even without EOS
    (R1 + "thinking... \\boxed{5}" + EOS, "5", "naive", 0.0),
    (R1 + "thinking... \\boxed{5}", "5", "naive", 0.0),
    (R1 + "thinking... \\boxed{6}", "5", "naive", 0.0),
    ("thinking \\boxed{5}", "5", "prime", 0.0),
    # two </think>: the naive format check fails; prime grades after the last one
    (R1 + "a</think>b</think> \\boxed{5}" + EOS, "5", "naive", 0.0),
    ("a</think>b</think> \\boxed{5}", "5", "prime", 1.0),
    ("a</think>\\boxed{5}</think> 6", "5", "prime", 0.1),
    # a box inside the thinking only
    (R1 + "so \\boxed{5}.\n\n</think>\n\nDone." + EOS, "5", "naive", 0.0),
    (R1 + "so \\boxed{5}.\n\n</think>\n\nDone.", "5", "naive", 0.1),
    (R1 + "so \\boxed{4}.\n\n</think>\n\n\\boxed{5}" + EOS, "5", "naive", 1.0),
    # no box after </think>: the whole tail is the prediction
    (r1("5"), "5", "naive", 1.0),
    (r1("The answer is 5"), "5", "naive", 1.0),
    (r1("The final answer is $5$."), "5", "naive", 1.0),
    (r1("x equals five"), "5", "naive", 0.0),
    (r1("7", eos=False), "5", "naive", 0.1),
    # an empty tail is 0, not 0.1
    (R1 + "a</think>   ", "5", "naive", 0.0),
    (R1 + "a</think>\n\n" + EOS, "5", "naive", 0.0),
    # the tail loses every trailing character of the EOS literal, as a character set
    (r1("5 cents"), "5", "naive", 1.0),
    (r1("the word is nods"), "nods", "naive", 0.0),
    (r1("the word is nods", eos=False), "nods", "naive", 0.1),
    # no assistant header
    ("Step.</think> \\boxed{5}" + EOS, "5", "naive", 0.0),
    ("<think>Step.</think> \\boxed{5}", "5", "naive", 0.0),
    ("Step.</think> \\boxed{5}", "5", "prime", 1.0),
    ("Step.</think> \\boxed{4}", "5", "prime", 0.1),
    ("Step.</think> \\boxed{4}" + EOS, "5", "prime", 0.0),
    # the format check (naive only)
    ("<｜User｜>q<｜Assistant｜>reasoning</think>\\boxed{5}" + EOS, "5", "naive", 0.0),
    ("<｜User｜>q<｜Assistant｜>reasoning</think>\\boxed{5}" + EOS, "5", "prime", 1.0),
    ("<｜User｜>q<｜Assistant｜></think><think>x \\boxed{5}" + EOS, "5", "naive", 0.0),
    ("<｜User｜>q<｜Assistant｜><think>a<think>b</think>\\boxed{5}", "5", "naive", 0.0),
    ("<｜User｜>q<｜Assistant｜><think>a<think>b</think>\\boxed{5}", "5", "prime", 1.0),
    ("<｜User｜>a <think>?<｜Assistant｜><think>x</think>\\boxed{5}" + EOS, "5", "naive", 1.0),
    # ChatML and "Assistant:" headers
    (CHATML + THINK + "\\boxed{5}<|im_end|>", "5", "naive", 1.0),
    (CHATML + THINK + "\\boxed{6}<|im_end|>", "5", "naive", 0.1),
    (CHATML + THINK + "5<|im_end|>", "5", "naive", None),  # the tail keeps "<|im_end|"
    (PLAIN + THINK + "\\boxed{5}", "5", "naive", 1.0),
    (PLAIN + THINK + "\\boxed{6}" + EOS, "5", "naive", 0.0),
    ("Assistant: hi</think>\\boxed{5}", "5", "prime", 1.0),
    (
        "<｜User｜>Who says Assistant: first?<｜Assistant｜><think>x</think>\\boxed{5}" + EOS,
        "5",
        "naive",
        1.0,
    ),
    # several boxes: the last one is the prediction
    (r1("\\boxed{2} and \\boxed{3}"), "2, 3", "naive", None),
    (r1("\\boxed{2} and \\boxed{3}"), "3", "naive", 1.0),
    (r1("\\boxed{3} and \\boxed{2}"), "3", "naive", None),
    (r1("\\boxed{2, 3}"), "2,3", "naive", 1.0),
    (r1("\\boxed{3, 2}"), "2, 3", "naive", None),
    (R1 + "\\boxed{4}</think> \\boxed{5}" + EOS, "5", "naive", 1.0),  # before </think>: ignored
    # units and \text{}
    (r1("\\boxed{5 \\text{ cm}}"), "5", "naive", 1.0),
    (r1("\\boxed{10\\text{ meters}}"), "10", "naive", 1.0),
    (r1("\\boxed{\\text{Monday}}"), "Monday", "naive", 1.0),
    (r1("\\boxed{\\text{(B)}}"), "B", "naive", 1.0),
    (r1("\\boxed{5\\%}"), "5", "naive", 1.0),
    (r1("\\boxed{50\\%}"), "0.5", "naive", None),
    (r1("\\boxed{30^\\circ}"), "30", "naive", 1.0),
    (r1("\\boxed{\\$5}"), "5", "naive", 1.0),
    (r1("\\boxed{7 \\text{ cm}}"), "5", "naive", 0.0),
    # fractions
    (r1("\\boxed{\\dfrac{1}{2}}"), "\\frac{1}{2}", "naive", 1.0),
    (r1("\\boxed{\\frac12}"), "\\frac{1}{2}", "naive", 1.0),
    (r1("\\boxed{1/2}"), "\\frac{1}{2}", "naive", 1.0),
    # the string tests give up on "x/2" (not integers) and math-verify parses no bare "x/2"
    (r1("\\boxed{x/2}"), "\\frac{x}{2}", "naive", 0.0),
    (r1("\\boxed{0.5}"), "\\frac{1}{2}", "naive", 1.0),
    (r1("\\boxed{\\frac{2}{3}}"), "0.67", "naive", 0.0),
    (r1("\\boxed{\\frac{3}{4}}", eos=False), "0.75", "naive", 1.0),
    (r1("\\boxed{\\tfrac{3}{4}}", eos=False), "0.75", "naive", 0.1),  # math-verify: no \\tfrac
    # boxes: double braces, \fbox, spaced, empty, never closed
    (r1("\\boxed{{5}}"), "5", "naive", 1.0),
    (r1("\\boxed{{1}+{2}}"), "3", "naive", None),
    (r1("\\fbox{5}"), "5", "naive", None),
    (r1("\\boxed 5"), "5", "naive", None),
    (r1("\\boxed{}"), "5", "naive", None),
    (r1("\\boxed{5"), "5", "naive", None),
    # the normalisations' quirks
    (r1("\\boxed{3j}"), "3i", "naive", 1.0),
    (r1("\\boxed{x = 3}"), "3", "naive", 1.0),
    (r1("\\boxed{xy = 3}"), "3", "naive", None),
    (r1("\\boxed{1,000}"), "1000", "naive", 1.0),
    (r1("\\boxed{5.00}"), "5", "naive", 1.0),
    (r1("\\boxed{(-\\infty, 3]}"), "(-inf, 3]", "naive", 1.0),
    (r1("\\boxed{\\left( 1, 2 \\right)}"), "(1,2)", "naive", 1.0),
    (r1("\\boxed{5}"), "\\boxed{5}", "naive", 1.0),
    (r1("答案是 \\boxed{5}"), "5", "naive", 1.0),
    (r1("\\boxed{5}\n"), "5", "naive", 1.0),
    (r1("\\boxed{12345678901234567890}"), "12345678901234567890", "naive", 1.0),
]


# The MATH answer-equivalence test pairs of the public hendrycks/math repository
# (modeling/math_equivalence_test.py), restated as (prediction, gold, value under the original's
# rule): 1 where the MATH-style forms agree, 0 where no test can match, None where math-verify
# decides (lists, equations, and a gold whose "2/3" makes the MATH-style form give up). The suite
# expects 0 for four of the None pairs; the original's rule gives 1 there (math-verify reads the
# bare strings), and so does msjax's `official`.
MATH_EQUIVALENCE_SUITE = [
    ("\\tfrac{1}{2} + \\frac1{72}", "\\\\frac{1}{2} + 2/3", None),
    ("10, 4, -2", "4, 10, -2", None),
    ("10, 4, 2", "4, 12, 2", None),
    ("\\tfrac{1}{2} +\\! \\frac1{72}", "\\\\dfrac{1}{2} +\\frac{1}{72}", 1.0),
    ("10\\text{ units}", "10 ", 1.0),
    ("10\\text{ units}", "100 ", 0.0),
    ("10", "\\$10", 1.0),
    ("\\left(x-2\\right)\\left(x+2\\right)", "(x-2)(x+2)", 1.0),
    ("0.1, 4, 2", "4, .1, 2", None),
    ("0.1", ".1", 1.0),
    ("10\\%", "10", 1.0),
    ("10\\sqrt{3} + \\sqrt4", "10\\sqrt3 + \\sqrt{4}", 1.0),
    ("\\frac34i", "\\frac{3}{4}i", 1.0),
    ("\\tfrac83", "\\frac{8}{3}", 1.0),
    ("5x - 7y + 11z + 4 = 0", "x + y - z + 2 = 0", None),
    ("1/2", "\\frac{1}{2}", 1.0),
]


@pytest.mark.parametrize("pred, gold, value", MATH_EQUIVALENCE_SUITE)
def test_math_equivalence_suite(pred, gold, value):
    for text in (r1(f"\\boxed{{{pred}}}"), r1(pred)):
        got = official_reward(text, gold)
        assert got == reference_reward(text, gold)
        if value is not None:
            assert got == value


def test_cases_cover_the_rule():
    assert len(CASES) >= 60
    values = [v for *_, v in CASES]
    assert {0.0, 0.1, 1.0} <= set(values) and sum(v is None for v in values) < 15
    assert {m for _, _, m, _ in CASES} == {"naive", "prime"}


@pytest.mark.parametrize("text, gold, manager, value", CASES)
def test_official_equals_the_restated_rule(text, gold, manager, value):
    got = official_reward(text, gold, manager=manager)
    assert got == reference_reward(text, gold, manager)
    if value is not None:
        assert got == value


def _random_text(rng: random.Random) -> tuple[str, str, str]:
    """A text assembled from headers, think tags, boxes, answers and EOS in random order."""
    answers = ["5", "6", "\\frac{1}{2}", "0.5", "x/2", "5 cm", "{5}", "1,000", "\\text{B}", ""]
    pieces = [
        lambda: rng.choice(["<｜Assistant｜>", "<|im_start|>assistant\n", "Assistant:", ""]),
        lambda: "<think>\n",
        lambda: "</think>",
        lambda: "Some step.\n\n",
        lambda: f"\\boxed{{{rng.choice(answers)}}}",
        lambda: rng.choice(answers),
        lambda: rng.choice(["\\boxed{", "}", " cents", "\n", "\\fbox{5}", "$"]),
    ]
    text = "".join(rng.choice(pieces)() for _ in range(rng.randint(1, 9)))
    if rng.random() < 0.5:
        text += EOS
    return text, rng.choice(answers[:-1]), rng.choice(["naive", "prime"])


def test_official_equals_the_restated_rule_on_random_texts():
    rng = random.Random(0)
    texts = [_random_text(rng) for _ in range(300)]
    got = [official_reward(t, g, manager=m) for t, g, m in texts]
    assert got == [reference_reward(t, g, m) for t, g, m in texts]
    assert {0.0, 0.1, 1.0} <= set(got)


@pytest.mark.parametrize(
    "s",
    [
        "  \\dfrac{1}{2}. ",
        "x \\in [0, 1)",
        "\\text{(A)}",
        "10 \\text{ dollars}",
        "\\frac1{72}",
        "\\sqrt3+\\sqrt{2}",
        "3.000 and 2.50",
        "infinity",
        "-inf",
        "k = \\frac 12",
        ".5",
        "1 / 2",
        "The final answer is $\\boxed{7}$",
        "a \\le b",
        "\\mbox{5 ways}",
        "\\overline{AB}",
        "{,}000",
        "\\frac",
        "4/x",
    ],
)
def test_normal_forms_equal_the_restated_ones(s):
    try:
        expected = strip_v2(s)
    except ValueError:
        with pytest.raises(ValueError):
            math_normal_form(s)
    else:
        assert math_normal_form(s) == expected
    assert final_answer_form(s) == final_norm(s)


@pytest.fixture(scope="module")
def official_verifiers():
    with (
        MathVerifier(num_workers=1, timeout_s=30.0, reward="official") as naive,
        MathVerifier(num_workers=1, timeout_s=30.0, reward="official", manager="prime") as prime,
    ):
        yield {"naive": naive, "prime": prime}


def test_batched_official_equals_single_items(official_verifiers):
    for manager, verifier in official_verifiers.items():
        cases = [(t, g) for t, g, m, _ in CASES if m == manager]
        long = ("a" * 600 + "</think>" + "b" * 600 + "\\boxed{5}", "5")  # graded in a worker
        cases.append(long)
        rewards = verifier.verify_batch([t for t, _ in cases], [g for _, g in cases])
        expected = [reference_reward(t, g, manager) for t, g in cases]
        np.testing.assert_allclose(rewards, expected)
        c = verifier.counters()
        assert c["items"] == len(cases) and c["verified"] >= 1 and c["fast"] >= 1


def test_prompts_are_prepended_for_official(official_verifiers):
    v = official_verifiers["naive"]
    prompt, response = R1, THINK + "\\boxed{5}" + EOS
    np.testing.assert_array_equal(v.verify_batch([response], ["5"], prompts=[prompt]), [1.0])
    np.testing.assert_array_equal(v.verify_batch([response], ["5"]), [0.0])  # no header


def test_unknown_manager_is_refused():
    with pytest.raises(ValueError, match="unknown reward manager 'dapo'"):
        official_reward(r1("\\boxed{5}"), "5", manager="dapo")
