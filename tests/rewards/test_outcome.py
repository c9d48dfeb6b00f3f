"""The training reward from config.reward: what each rule reads from token rows, the 0.1 -> 0
step, the recipe fields and their validation."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from fake_compare import never_equal

from msjax.data.synthetic_tokenizer import build_synthetic_tokenizer
from msjax.rewards import MathVerifier, math_reward, official_reward
from msjax.rewards.outcome import OutcomeReward, check_reward_config
from msjax.rl.config import default_config, validate
from msjax.tokenizer import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
PROMPT = f"{BOS_TOKEN}{USER_TOKEN}Compute 7 + 5.{ASSISTANT_TOKEN}<think>\n"
# (response, gold): right, wrong without EOS (official 0.1), wrong with EOS, no </think>,
# a box inside the thinking only
RESPONSES = [
    (f"7 + 5 = 12.\n\n</think>\n\nThe answer is \\boxed{{12}}.{EOS_TOKEN}", "12"),
    ("7 + 5 = 13.\n\n</think>\n\nThe answer is \\boxed{13}.", "12"),
    (f"7 + 5 = 13.\n\n</think>\n\nThe answer is \\boxed{{13}}.{EOS_TOKEN}", "12"),
    ("7 + 5 = 12.\n\nSo \\boxed{12}", "12"),
    (f"So \\boxed{{12}}.\n\n</think>\n\nDone.{EOS_TOKEN}", "12"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_synthetic_tokenizer()


@pytest.fixture(scope="module")
def rows(tokenizer):
    prompt = tokenizer.encode(PROMPT)
    return (
        [prompt] * len(RESPONSES),
        [tokenizer.encode(r) for r, _ in RESPONSES],
        [g for _, g in RESPONSES],
    )


@pytest.mark.parametrize(
    "name, manager", [("math", "naive"), ("official", "naive"), ("official", "prime")]
)
def test_each_rule_reads_its_text_and_zeroes_the_unfinished_reward(tokenizer, rows, name, manager):
    prompts, responses, golds = rows
    verifier = MathVerifier(1, reward=name, manager=manager, compare_fn=never_equal)
    reward = OutcomeReward(tokenizer, verifier=verifier)
    try:
        got = reward(prompts, responses, golds)
    finally:
        reward.close()
    if name == "math":
        expected = [math_reward(r.replace(EOS_TOKEN, ""), g, prompt=PROMPT) for r, g in RESPONSES]
        assert expected == [1, 0, 0, 0, 0]
    else:
        # What the original's manager hands over: prompt + response with special tokens
        # ("naive"), the response without them ("prime"); then 0.1 -> 0.
        naive = manager == "naive"
        texts = [PROMPT + r if naive else r.replace(EOS_TOKEN, "") for r, _ in RESPONSES]
        raw = [official_reward(t, g, manager=manager) for t, (_, g) in zip(texts, RESPONSES)]
        assert raw == ([1, 0.1, 0, 0, 0] if manager == "naive" else [1, 0.1, 0.1, 0, 0.1])
        expected = [0.0 if v == 0.1 else v for v in raw]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    texts = [reward.texts(p, r) for p, r in zip(prompts, responses)]
    clean = RESPONSES[0][0].replace(EOS_TOKEN, "")
    assert (
        texts[0]
        == {
            "math": (PROMPT, clean),
            "naive": ("", PROMPT + RESPONSES[0][0]),
            "prime": ("", clean),
        }[name if name == "math" else manager]
    )


def test_bad_rows_are_refused(tokenizer):
    reward = OutcomeReward(tokenizer, verifier=MathVerifier(1, compare_fn=never_equal))
    with pytest.raises(ValueError, match="2 prompts, 1 responses and 1 golds"):
        reward([[1], [2]], [[3]], ["1"])
    assert reward([], [], []).shape == (0,)


def _config(**reward):
    c = default_config()
    c.workdir = "/tmp/unused"
    c.reward.update(reward)
    return c


def test_reward_fields_are_validated():
    validate(_config())
    validate(_config(name="official", manager="prime"))
    with pytest.raises(ValueError, match=r"config.reward.name='exact' must be one of"):
        validate(_config(name="exact"))
    with pytest.raises(ValueError, match=r"config.reward.manager='dapo' must be one of"):
        validate(_config(name="official", manager="dapo"))
    old = _config()
    old.rollout.missing_eos_reward = 0.1  # an old recipe's knob
    with pytest.raises(ValueError, match="missing_eos_reward was removed.*reward.name='official'"):
        check_reward_config(old)


@pytest.mark.parametrize(
    "recipe, manager",
    [("metastone_1p5b", "naive"), ("metastone_7b", "naive"), ("metastone_32b", "prime")],
)
def test_metastone_recipes_use_the_official_reward(recipe, manager):
    spec = importlib.util.spec_from_file_location(recipe, CONFIGS / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert (c.reward.name, c.reward.manager) == ("official", manager)
    assert "missing_eos_reward" not in c.rollout
    assert default_config().reward.name == "math"  # the toy recipes keep the lenient reward
