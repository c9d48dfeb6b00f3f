"""The synthetic step task: generation bounds, exact formats, flawed solutions and their labels."""

import numpy as np
import pytest

from msjax.data.step_labels import label_steps
from msjax.data.synthetic import (
    ERROR_KINDS,
    Difficulty,
    MixedSolutions,
    Problem,
    flawed_solution,
    generate_examples,
    gold_solution,
    parse_problem,
    sample_problem,
)

CHAIN = Problem(7, (("+", 5), ("*", 3), ("-", 4)))


def test_gold_format_by_hand():
    assert CHAIN.text == "Start with 7. Add 5. Multiply by 3. Subtract 4."
    assert CHAIN.values == (12, 36, 32)
    assert gold_solution(CHAIN) == (
        "7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 - 4 = 32.\n\n</think>\n\nThe answer is \\boxed{32}."
    )
    assert parse_problem(CHAIN.text) == CHAIN


@pytest.mark.parametrize(
    "d",
    [Difficulty(), Difficulty(min_steps=5, max_steps=8, max_operand=20, max_value=50, ops="+*")],
)
def test_samples_respect_difficulty(d):
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = sample_problem(rng, d)
        assert d.min_steps <= len(p.ops) <= d.max_steps
        assert 1 <= p.start <= d.max_start
        assert all(0 <= v <= d.max_value for v in p.values)
        assert all(op in d.ops and (2 if op == "*" else 1) <= b <= d.max_operand for op, b in p.ops)
        assert parse_problem(p.text) == p


def test_generate_examples_distinct_excluding_and_bounded():
    rng = np.random.default_rng(1)
    train = generate_examples(200, Difficulty(), rng)
    assert len({e.problem for e in train}) == 200
    test = generate_examples(50, Difficulty(), rng, exclude={e.problem for e in train})
    assert not {e.problem for e in test} & {e.problem for e in train}
    e = train[0]
    p = parse_problem(e.problem)
    assert (e.answer, e.solution, e.num_steps) == (str(p.answer), gold_solution(p), len(p.ops))
    tiny = Difficulty(min_steps=1, max_steps=1, max_start=1, max_operand=2, ops="+")
    with pytest.raises(ValueError, match="distinct problems"):
        generate_examples(5, tiny, rng)  # only "Start with 1. Add 1/2." exist


def test_bad_difficulty_and_problem_rejected():
    with pytest.raises(ValueError, match="min_steps"):
        Difficulty(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="ops"):
        Difficulty(ops="+/")
    with pytest.raises(ValueError, match="'\\+' or '-'"):
        Difficulty(ops="*")
    with pytest.raises(ValueError, match="not a synthetic-step problem"):
        parse_problem("What is 2 + 2?")


def test_flawed_solution_by_hand():
    # An arithmetic error at step 1 with the wrong value carried on with correct arithmetic.
    f = flawed_solution(CHAIN, 1, "arithmetic", np.random.default_rng(0))
    wrong = int(f.text.split("\n\n")[1].split("= ")[1].rstrip("."))
    assert wrong != 36
    assert f.text.startswith(f"7 + 5 = 12.\n\n12 * 3 = {wrong}.\n\n{wrong} - 4 = {wrong - 4}.\n\n")
    assert f.answer == str(wrong - 4)
    assert f.locally_correct == (True, False, True)
    assert f.on_track == (True, False, False)


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_flawed_solutions_labels_and_answers(kind):
    rng = np.random.default_rng(2)
    for _ in range(60):
        p = sample_problem(rng, Difficulty(max_steps=6))
        k = int(rng.integers(len(p.ops)))
        f = flawed_solution(p, k, kind, rng)
        n = len(p.ops)
        assert f.locally_correct == tuple(i != k for i in range(n))
        assert f.on_track == tuple(i < k for i in range(n))
        assert f.answer != str(p.answer)  # an error always changes the final answer
        labels = label_steps(p.text, f.text)  # the independent labeller agrees
        assert (labels.locally_correct, labels.on_track) == (f.locally_correct, f.on_track)
    with pytest.raises(ValueError, match="error_step"):
        flawed_solution(p, len(p.ops), kind, rng)


def test_mixed_solutions_fraction_and_determinism():
    rng = np.random.default_rng(3)
    problems = [sample_problem(rng, Difficulty()) for _ in range(400)]
    fn = MixedSolutions(0.3)
    out = [
        fn({"problem": p.text.encode()}, np.random.default_rng([0, i]))
        for i, p in enumerate(problems)
    ]
    again = [fn({"problem": p.text}, np.random.default_rng([0, i])) for i, p in enumerate(problems)]
    assert out == again
    flawed = sum(o != gold_solution(p) for o, p in zip(out, problems, strict=True))
    assert 0.22 < flawed / len(problems) < 0.38
    with pytest.raises(ValueError, match="flawed_fraction"):
        MixedSolutions(1.5)
