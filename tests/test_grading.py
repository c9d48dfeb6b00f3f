"""Grading reads the prompt: a response cut off inside a think span that its prompt opened earns
nothing from a box written while thinking (evaluation.sample_candidates with math_reward, and
msjax-infer's grading with the math and official training rewards); C-Eval rows by the letter
rule on prompt + response."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hf"))
from tiny_hf import write_r1_tokenizer  # noqa: E402

from msjax.evaluation import sample_candidates  # noqa: E402
from msjax.generate.config import FINISH_REASONS  # noqa: E402
from msjax.generate.infer import _grade  # noqa: E402
from msjax.generate.sampler import SampleResult  # noqa: E402
from msjax.generate.tts import Candidate, Choice  # noqa: E402
from msjax.rewards.outcome import OutcomeReward  # noqa: E402
from msjax.tokenizer import Tokenizer  # noqa: E402

WORDS = ["Q", "<think>", "</think>", "so", "\\boxed{7}", "\\boxed{8}", "<pad>"]


class WordTokenizer:
    """ids -> space-joined words."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(WORDS[i] for i in ids)


def ids(text):
    return [WORDS.index(w) for w in text.split()]


class FixedSampler:
    """Returns the given responses (n per prompt, in order) whatever it is asked."""

    def __init__(self, responses):
        self.responses = [ids(r) for r in responses]

    def __call__(self, params, prompts, *, n, key, prompt_ids=None):
        rows = len(self.responses)
        width = max(map(len, self.responses))
        tokens = np.full((rows, width), WORDS.index("<pad>"), np.int32)
        for r, t in enumerate(self.responses):
            tokens[r, : len(t)] = t
        zeros = np.zeros(rows, np.float32)
        return SampleResult(
            tokens=tokens,
            logprobs=np.zeros(tokens.shape, np.float32),
            lengths=np.asarray([len(t) for t in self.responses], np.int32),
            finish=np.full(rows, FINISH_REASONS.index("length"), np.int32),
            prompt_lengths=np.asarray([len(prompts[r // n]) for r in range(rows)], np.int32),
            scores=zeros,
            step_scores=np.zeros((rows, 1), np.float32),
            step_positions=np.full((rows, 1), -1, np.int32),
            num_steps=np.zeros(rows, np.int32),
            n=n,
        )


def test_sample_candidates_reads_whether_the_prompt_opened_a_think_span():
    # The rule restated: with a think span open (in the prompt or the response), only a box
    # after "</think>" counts; without one, the last box of the response.
    prompts = [ids("Q <think>"), ids("Q")]
    responses = ["so \\boxed{7}", "so </think> \\boxed{7}", "so \\boxed{7}", "\\boxed{8}"]
    cands = sample_candidates(
        FixedSampler(responses), None, WordTokenizer(), prompts, ["7", "7"], k=2, key=None
    )
    assert cands.correct.tolist() == [[False, True], [True, False]]


@pytest.fixture(scope="module")
def r1_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("r1")
    write_r1_tokenizer(path)
    return Tokenizer.from_dir(path)


def test_infer_grading_with_the_training_rewards(r1_tokenizer):
    """Each rule as the trainer applies it (official "naive": prompt + response with special
    tokens; a wrong answer's 0.1 counts as wrong); pruned candidates stay ungraded."""
    tok = r1_tokenizer
    prompt = "<｜begin▁of▁sentence｜><｜User｜>a b<｜Assistant｜><think>\n"
    eos = "<｜end▁of▁sentence｜>"
    responses = [
        ("c .\n\n \\boxed{1}", "length"),  # cut off while thinking: nothing
        (f"c </think> \\boxed{{1}} {eos}", "eos"),  # right
        (f"c </think> 2 {eos}", "eos"),  # wrong (official: the whole tail "2")
        ("c </think> \\boxed{1}", "length"),  # right without EOS
        (f"</think> </think> \\boxed{{1}} {eos}", "eos"),  # two </think>: bad official format
        ("\\boxed{1}", "pruned"),
    ]
    cands = [Candidate(r, tok.encode(r), 0.0, [], [], reason, None) for r, reason in responses]
    chunk = [{"ids": tok.encode(prompt), "prompt": prompt, "gold": "1", "task": "math"}]
    choices = [Choice(cands, 0)]
    expected = {
        ("math", "naive"): [False, True, False, True, True, None],
        ("official", "naive"): [False, True, False, True, False, None],
    }
    for (name, manager), want in expected.items():
        reward = OutcomeReward(tok, name, manager, workers=1)
        try:
            assert _grade(chunk, choices, reward) == [want], name
        finally:
            reward.close()
    ceval = [{"ids": [1], "prompt": f"x answer: {x}", "gold": "B", "task": "ceval"} for x in "bC"]
    flags = _grade(ceval, [Choice(cands[:1], 0)] * 2, reward=None)
    assert flags == [[True], [False]]
