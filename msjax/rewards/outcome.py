"""The training reward: `config.reward` -> rewards f32[rows] of sampled token rows.

Recipe fields (validated by `check_reward_config`):
  reward.name: "math" (`msjax.rewards.math`, the default: lenient, no think-format check) or
    "official" (the original's rule, `msjax.rewards.official`; the MetaStone recipes).
  reward.manager: "naive" or "prime", the original's reward manager ("official" only).
What each rule reads, as the original's managers hand it over:
  "math": the decoded response without special tokens (an EOS token is no part of an answer),
    after the decoded prompt (which says whether a think span is open);
  "official" + "naive": the decoded prompt + response with special tokens (the 1.5B / 7B runs);
  "official" + "prime": the decoded response alone, special tokens skipped (the 32B run).
The original's trainer then sets the official 0.1 (wrong and no EOS) to 0 before advantages;
`OutcomeReward` returns rewards after that step: 1 or 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from msjax.rewards.math import REWARDS, MathVerifier
from msjax.rewards.official import MANAGERS, UNFINISHED_REWARD


def check_reward_config(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for a bad `config.reward` or a removed knob."""
    if "missing_eos_reward" in c.rollout:
        raise ValueError(
            "config.rollout.missing_eos_reward was removed: set config.reward.name='official' "
            "for the original's rule (its 0.1 for a wrong response without EOS is set to 0 "
            "before advantages, as in the original trainer) and drop the field."
        )
    if c.reward.name not in REWARDS:
        raise ValueError(f"config.reward.name={c.reward.name!r} must be one of {REWARDS}.")
    if c.reward.manager not in MANAGERS:
        raise ValueError(f"config.reward.manager={c.reward.manager!r} must be one of {MANAGERS}.")


class OutcomeReward:
    """Training rewards of (prompt ids, response ids, gold) rows (see the module docstring).

    tokenizer: a `msjax.tokenizer.Tokenizer`; verifier: a `MathVerifier` of the same rule
    (default: one with `workers` processes and a `timeout_s` per item).
    """

    def __init__(
        self,
        tokenizer,
        name: str = "math",
        manager: str = "naive",
        *,
        workers: int = 2,
        timeout_s: float = 10.0,
        verifier: MathVerifier | None = None,
    ):
        self.tokenizer = tokenizer
        self.verifier = verifier or MathVerifier(workers, timeout_s, reward=name, manager=manager)
        self.name, self.manager = self.verifier.reward, self.verifier.manager

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict, tokenizer) -> OutcomeReward:
        check_reward_config(c)
        return cls(
            tokenizer,
            c.reward.name,
            c.reward.manager,
            workers=c.rollout.reward_workers,
            timeout_s=c.rollout.reward_timeout_s,
        )

    def texts(self, prompt: Sequence[int], response: Sequence[int]) -> tuple[str, str]:
        """(prompt text, response text) of one row, as the rule reads them."""
        decode = self.tokenizer.decode
        if self.name == "math":
            return decode(prompt), decode(response, skip_special_tokens=True)
        if self.manager == "naive":
            return "", decode([*prompt, *response])
        return "", decode(response, skip_special_tokens=True)

    def __call__(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        golds: Sequence[str],
    ) -> np.ndarray:
        """Rewards f32[rows] (1 / 0) of prompts[i] + responses[i] against golds[i]."""
        if not len(prompts) == len(responses) == len(golds):
            raise ValueError(
                f"{len(prompts)} prompts, {len(responses)} responses and {len(golds)} golds"
            )
        if not responses:
            return np.zeros(0, np.float32)
        prompt_texts, response_texts = zip(*map(self.texts, prompts, responses), strict=True)
        rewards = self.verifier.verify_batch(response_texts, golds, prompts=prompt_texts)
        return np.where(np.isclose(rewards, UNFINISHED_REWARD), 0.0, rewards).astype(np.float32)

    def counters(self) -> dict[str, int]:
        return self.verifier.counters()

    def close(self) -> None:
        self.verifier.close()
