"""The key/value cache shared by prefill and decode."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from msjax.models.config import ModelConfig

CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_seq", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values: k, v: [layers, batch, kv_heads, max_len, head_dim].

    Heads before positions: attention reads a layer's keys as [batch, kv_heads, keys, head_dim]
    batched matmul operands directly (a [.., max_len, kv_heads, ..] layout made XLA:CPU copy
    every layer's whole cache into that order on every decode step)."""

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache (compute dtype unless `dtype` is given)."""
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        dtype = cfg.jnp_dtype if dtype is None else dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
