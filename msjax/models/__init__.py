"""Qwen2 backbone, SPRM head and the combined reflective model."""

from msjax.models.config import ModelConfig
from msjax.models.kv_cache import KVCache
from msjax.models.reflective import ModelOutput, ReflectiveModel, abstract_model, create_model
from msjax.models.sprm import SPRMHead, scale_gradient, step_mask, trajectory_score

__all__ = [
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "ReflectiveModel",
    "abstract_model",
    "create_model",
    "SPRMHead",
    "scale_gradient",
    "step_mask",
    "trajectory_score",
]
