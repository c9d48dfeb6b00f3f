"""Outcome rewards: math answer extraction and verification."""

from msjax.rewards.math import (
    MathVerifier,
    answers_match,
    extract_boxed,
    fast_match,
    math_reward,
)
from msjax.rewards.pool import TimeoutPool

__all__ = [
    "MathVerifier",
    "TimeoutPool",
    "answers_match",
    "extract_boxed",
    "fast_match",
    "math_reward",
]
