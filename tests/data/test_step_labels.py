"""Step labels: hand-written cases, and alignment with the SPRM's step positions in token space."""

import numpy as np
import pytest

from msjax.data.step_labels import (
    first_error,
    label_step_texts,
    label_steps,
    split_steps,
    step_positions,
    token_step_labels,
)
from msjax.data.synthetic import (
    ERROR_KINDS,
    Difficulty,
    flawed_solution,
    gold_solution,
    sample_problem,
)
from msjax.data.synthetic_tokenizer import build_synthetic_tokenizer
from msjax.tokenizer import render_prompt

PROBLEM = "Start with 7. Add 5. Multiply by 3. Subtract 4."
TAIL = "</think>\n\nThe answer is \\boxed{32}."


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


def test_correct_solution_is_all_correct():
    labels = label_steps(PROBLEM, "7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 - 4 = 32.\n\n" + TAIL)
    assert labels.steps == ("7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32")
    assert labels.locally_correct == labels.on_track == (True, True, True)
    # Spacing does not matter.
    assert (
        label_steps(PROBLEM, "7+5=12.\n\n 12 *3 = 36 .\n\n36-4 = 32.\n\n").on_track == (True,) * 3
    )


@pytest.mark.parametrize(
    "response, local, track",
    [
        # arithmetic error at step 1, carried on with correct arithmetic
        ("7 + 5 = 12.\n\n12 * 3 = 35.\n\n35 - 4 = 31.\n\n", (1, 0, 1), (1, 0, 0)),
        # error at step 0 (wrong operand), then consistent
        ("7 + 6 = 13.\n\n13 * 3 = 39.\n\n39 - 4 = 35.\n\n", (0, 1, 1), (0, 0, 0)),
        # miscopied input at step 2
        ("7 + 5 = 12.\n\n12 * 3 = 36.\n\n63 - 4 = 59.\n\n", (1, 1, 0), (1, 1, 0)),
        # error, then a jump back to the gold path: on track again but not consistent
        ("7 + 5 = 12.\n\n12 * 3 = 35.\n\n36 - 4 = 32.\n\n", (1, 0, 0), (1, 0, 1)),
        # right arithmetic, wrong operator for the problem
        ("7 + 5 = 12.\n\n12 + 3 = 15.\n\n15 - 4 = 11.\n\n", (1, 0, 1), (1, 0, 0)),
        # an unparseable step: neither; the next one has no own input to follow
        ("7 + 5 = 12.\n\nthen times three.\n\n36 - 4 = 32.\n\n", (1, 0, 0), (1, 0, 1)),
        # an extra step beyond the problem: neither
        (
            "7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 - 4 = 32.\n\n32 + 1 = 33.\n\n",
            (1, 1, 1, 0),
            (1, 1, 1, 0),
        ),
        # truncated before </think>: only delimited steps count
        ("7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 - 4", (1, 1), (1, 1)),
    ],
)
def test_error_cases_by_hand(response, local, track):
    labels = label_steps(PROBLEM, response + TAIL if response.endswith("\n\n") else response)
    assert labels.locally_correct == tuple(map(bool, local))
    assert labels.on_track == tuple(map(bool, track))


def test_first_error_finds_every_injected_error():
    rng = np.random.default_rng(0)
    d = Difficulty(min_steps=2, max_steps=8, max_start=19, max_operand=9, max_value=29)
    for _ in range(60):
        problem = sample_problem(rng, d)
        assert first_error(problem, gold_solution(problem)) is None
        for kind in ERROR_KINDS:
            step = int(rng.integers(len(problem.ops)))
            flawed = flawed_solution(problem, step, kind, rng)
            assert first_error(problem, flawed.text) == (step, kind)
            # The same step as the first one the labels call locally wrong.
            assert label_steps(problem, flawed.text).locally_correct.index(False) == step


@pytest.mark.parametrize(
    "response, expected",
    [
        ("7 + 5 = 12.\n\n12 * 3 = 36.\n\n" + TAIL, (2, "missing_steps")),
        # the second operation skipped: step 1 uses the third one
        ("7 + 5 = 12.\n\n12 - 4 = 8.\n\n" + TAIL, (1, "operand")),
        ("7 + 5 = 12.\n\n13 * 3 = 39.\n\n39 - 4 = 35.\n\n" + TAIL, (1, "copy")),
        ("7 + 5 = 12.\n\nso 12 * 3 = 36.\n\n36 - 4 = 32.\n\n" + TAIL, (1, "format")),
        ("7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 - 4 = 32.\n\n32 + 1 = 33.\n\n", (3, "extra_step")),
        ("7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 - 4 = 32.\n\n</think>\\boxed{31}", None),
    ],
)
def test_first_error_by_hand(response, expected):
    assert first_error(PROBLEM, response) == expected


def test_split_rule_edges():
    # The first delimiter of a run counts; a delimiter opening the span does not; text after
    # </think> is not a step; a single <think> opens the span.
    assert split_steps("a.\n\n.\n\nb.\n\n</think>c.\n\n") == ["a", "b"]
    assert split_steps(".\n\na.\n\n") == ["a"]
    assert split_steps("x.\n\n<think>.\n\na.\n\n</think>") == ["a"]
    assert split_steps("<think>a.\n\n<think>b.\n\n") == ["<think>a", "<think>b"]  # two: from 0
    assert split_steps("no steps here") == []
    assert label_step_texts(PROBLEM, []).steps == ()


def _mask_reference(rows, tok):
    """Independent reference: msjax.models.sprm.step_mask (the SPRM's own rule), one padded
    batch of (tokens, prompt_len) rows -> the scored positions of each row."""
    sprm = pytest.importorskip("msjax.models.sprm")
    width = max(len(t) for t, _ in rows)
    tokens = np.full((len(rows), width), tok.pad_id, np.int32)
    valid = np.zeros_like(tokens, bool)
    for i, (t, _) in enumerate(rows):
        tokens[i, : len(t)], valid[i, : len(t)] = t, True
    scorable = np.arange(width)[None] >= np.asarray([n for _, n in rows])[:, None]
    mask = sprm.step_mask(
        tokens, valid, tok.step_ids, tok.think_start_id, tok.think_end_id, scorable=scorable
    )
    return [np.flatnonzero(row) for row in np.asarray(mask)]


def _responses(seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(12):
        p = sample_problem(rng, Difficulty(max_steps=5))
        out.append((p.text, gold_solution(p)))
        out.append((p.text, flawed_solution(p, int(rng.integers(len(p.ops))), "copy", rng).text))
        if i % 3 == 0:  # irregular model-like outputs
            g = gold_solution(p)
            out.append((p.text, g.replace(".\n\n", ".\n\n.\n\n", 1)))
            out.append((p.text, ".\n\n" + g.split("</think>")[0]))  # delimiter first, truncated
            out.append((p.text, g.replace(" = ", " equals ", 1)))
    return out


@pytest.mark.parametrize("template", ["plain", "r1"])
def test_token_labels_align_with_sprm_positions(tok, template):
    rows, cases = [], []
    for problem, response in _responses(0):
        prompt_ids = tok.encode(render_prompt(problem, template, None))
        response_ids = tok.encode(response) + [tok.eos_id]
        got = token_step_labels(tok, problem, prompt_ids, response_ids)
        tokens = prompt_ids + response_ids
        assert all(tokens[p + 1] in tok.step_ids for p in got.positions)
        # The labels are those of the text labeller on the same response.
        text = label_steps(problem, response)
        assert got.steps == text.steps
        assert tuple(got.locally_correct) == text.locally_correct
        assert tuple(got.on_track) == text.on_track
        rows.append((tokens, len(prompt_ids)))
        cases.append(got)
    # The positions are the SPRM's, each the token just before a delimiter.
    for got, want in zip(cases, _mask_reference(rows, tok), strict=True):
        np.testing.assert_array_equal(got.positions, want)
    assert sum(len(c.positions) for c in cases) > 100


def test_step_positions_edges_by_hand():
    # ids: 5 = delimiter, 1 = <think>, 2 = </think>
    toks = [9, 1, 5, 7, 5, 5, 7, 5, 2, 7, 5]
    # delimiters at 2 (right after <think>: no), 4 (yes -> 3), 5 (run: no), 7 (yes -> 6),
    # 10 (after </think>: no)
    np.testing.assert_array_equal(step_positions(toks, [5], 1, 2), [3, 6])
    np.testing.assert_array_equal(step_positions(toks, [5], 1, 2, scorable_from=4), [6])
    # Two <think>: the span starts at the text start (exclusive), so position 0 never scores.
    np.testing.assert_array_equal(step_positions([7, 5, 1, 1, 7, 5], [5], 1, None), [4])
