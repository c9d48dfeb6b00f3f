"""Rollouts and test-time scaling: the jitted KV-cache sampler with streamed SPRM step scores,
Best-of-N / votes / pruning, and the metrics that go with them."""

from msjax.generate.config import FINISH_REASONS, SamplerConfig
from msjax.generate.pruning import PruneRule
from msjax.generate.sampler import Sampler, SampleResult

__all__ = ["FINISH_REASONS", "PruneRule", "SampleResult", "Sampler", "SamplerConfig"]
