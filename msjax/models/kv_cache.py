"""The key/value cache shared by prefill and decode."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from msjax.models.config import ModelConfig

CACHE_AXES = ("layers", "batch", "cache_seq", "act_kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values: k, v: [layers, batch, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache (compute dtype unless `dtype` is given)."""
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dtype = cfg.jnp_dtype if dtype is None else dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
