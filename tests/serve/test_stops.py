"""Text stop strings and the SPRM steps of a cut response, against the step rule of REFERENCE
section 2 restated as a plain loop."""

from __future__ import annotations

import pytest

from msjax.serve.stops import Sample, find_stop, geometric_mean, steps_after_cut

STEP, START, END = 9, 7, 8
WORDS = {1: "a", 2: "b", 3: "cd", 4: "\n", STEP: ".\n\n", START: "<think>", END: "</think>"}


def decode(ids):
    return "".join(WORDS[i] for i in ids)


def counted(ids, prompt_len):
    """Scored positions of the inference rule, response delimiters only (plain loop)."""
    lo = ids.index(START) if ids.count(START) == 1 else 0
    hi = ids.index(END) if ids.count(END) == 1 else len(ids)
    out = []
    for j in range(max(prompt_len, 1), len(ids)):
        if ids[j] == STEP and ids[j - 1] != STEP and ids[j - 1] != START and lo < j - 1 < hi:
            out.append(j - 1)
    return out


def score_at(p):
    return 0.05 + 0.9 * ((p * 37) % 19) / 19


def sample_of(prompt, response):
    ids = prompt + response
    pos = counted(ids, len(prompt))
    scores = [score_at(p) for p in pos]
    return Sample(response, "eos", geometric_mean(scores), scores, pos)


def test_find_stop_on_decoded_text():
    ids = [1, 2, 3, 4, 4, 1, 3]  # "a" "b" "cd" "\n" "\n" "a" "cd"
    assert find_stop(ids, ["x"], decode) is None
    assert find_stop(ids, [], decode) is None
    assert find_stop(ids, ["c"], decode) == (3, "abc")  # cut inside a token, stop string kept
    assert find_stop(ids, ["\n\n", "b"], decode) == (2, "ab")  # the earliest completed stop
    assert find_stop(ids, ["d\n\na"], decode) == (6, "abcd\n\na")  # spans tokens
    assert find_stop(ids, ["cd", "bc"], decode) == (3, "abcd")  # first of `stops` found there


@pytest.mark.parametrize(
    "prompt, response",
    [
        ([START, 1], [2, STEP, 1, STEP, STEP, 2, STEP, END, 1, STEP]),
        ([1, 2], [START, 1, STEP, 2, STEP, END, 3, STEP]),
        ([START, 1], [STEP, 2, STEP, END, 1, END, 2, STEP, 1]),  # two </think>: hi = length
        ([1], [2, STEP, 1, STEP, START, 2, STEP]),  # cutting the only <think> needs a rescore
    ],
)
def test_steps_after_cut_match_the_rule_on_the_shorter_text(prompt, response):
    sample = sample_of(prompt, response)
    rescored = 0
    for k in range(1, len(response) + 1):
        cut = steps_after_cut(prompt, sample, k, [STEP], START, END)
        expect = counted(prompt + response[:k], len(prompt))
        if cut is None:  # the cut removed the text's only <think>, and a new step counts
            assert response.count(START) + prompt.count(START) == 1 and START in response[k:]
            assert set(expect) - set(sample.step_positions)
            rescored += 1
            continue
        assert cut.tokens == response[:k] and cut.step_positions == expect
        assert cut.step_scores == [score_at(p) for p in expect]
        assert cut.score == pytest.approx(geometric_mean(cut.step_scores))
    assert rescored == (3 if prompt == [1] else 0)


def test_geometric_mean():
    assert geometric_mean([]) == 0.0
    assert geometric_mean([0.25, 1.0]) == pytest.approx(0.5)
    assert geometric_mean([0.0, 1.0]) == pytest.approx(1e-5)  # clamped at 1e-10
