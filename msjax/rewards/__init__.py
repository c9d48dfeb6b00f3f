"""Outcome rewards: math answer extraction and verification, and the original work's rule."""

from msjax.rewards.ceval import ceval_letter, ceval_reward
from msjax.rewards.math import (
    REWARDS,
    MathVerifier,
    answers_match,
    extract_boxed,
    fast_match,
    final_answer_items,
    math_reward,
)
from msjax.rewards.official import MANAGERS, official_reward
from msjax.rewards.pool import TimeoutPool

__all__ = [
    "MANAGERS",
    "REWARDS",
    "MathVerifier",
    "TimeoutPool",
    "answers_match",
    "ceval_letter",
    "ceval_reward",
    "extract_boxed",
    "fast_match",
    "final_answer_items",
    "math_reward",
    "official_reward",
]
