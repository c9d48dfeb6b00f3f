"""docs/rewards.md: every row of its table of differences between `math` and `official` holds."""

import re
from pathlib import Path

import pytest

from msjax.rewards import math_reward, official_reward

DOC = Path(__file__).resolve().parents[2] / "docs" / "rewards.md"
EOS = "<｜end▁of▁sentence｜>"
PROMPTS = {
    "R1": "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>\n",
    "plain": "User: Q\nAssistant: ",
    "none": "",
}
ROW_RE = re.compile(r"^\| (R1|plain|none) \| `(.+?)` \| `(.+?)` \| ([0-9.]+) \| ([0-9.]+) \|")
ROWS = [m.groups() for line in DOC.read_text().splitlines() if (m := ROW_RE.match(line))]


def test_the_table_is_read():
    assert len(ROWS) >= 15


@pytest.mark.parametrize("prompt, response, gold, math_value, official_value", ROWS)
def test_documented_difference(prompt, response, gold, math_value, official_value):
    prompt = PROMPTS[prompt]
    assert math_reward(response.replace("⟨EOS⟩", ""), gold, prompt=prompt) == float(math_value)
    text = prompt + response.replace("⟨EOS⟩", EOS)
    assert official_reward(text, gold) == float(official_value)
    assert math_value != official_value
