"""Rollouts and test-time scaling: the fixed-batch jitted KV-cache Sampler and the continuous
batching Engine (per-request settings), both with streamed SPRM step scores; Best-of-N / votes /
early pruning, and the metrics that compare them."""

from msjax.generate.config import FINISH_REASONS, SamplerConfig
from msjax.generate.engine import Engine, EngineSampler, Request
from msjax.generate.pruning import PruneRule
from msjax.generate.sampler import Sampler, SampleResult
from msjax.generate.tts import (
    MODES,
    Candidate,
    Choice,
    bon_at_k,
    generate_and_select,
    maj_at_k,
    pass_at_1,
    random_at_k,
    resolve_k,
    select,
    token_stats,
    weighted_at_k,
)

__all__ = [
    "FINISH_REASONS",
    "MODES",
    "Candidate",
    "Choice",
    "Engine",
    "EngineSampler",
    "PruneRule",
    "Request",
    "SampleResult",
    "Sampler",
    "SamplerConfig",
    "bon_at_k",
    "generate_and_select",
    "maj_at_k",
    "pass_at_1",
    "random_at_k",
    "resolve_k",
    "select",
    "token_stats",
    "weighted_at_k",
]
