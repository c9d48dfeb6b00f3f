"""Model configuration: the Qwen2 decoder hyper-parameters plus the SPRM head settings."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("dense", "chunked")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a reflective Qwen2 model (decoder + SPRM head).

    Field names follow the Qwen2 vocabulary (`num_layers` is HF's `num_hidden_layers`, ...).
    `param_dtype` is the storage dtype of the parameters, `dtype` the compute dtype of
    activations; norms, softmax, logits and the SPRM head always run in float32.
    `remat` picks what the layer scan saves for the backward pass: "none" (everything),
    "full" (only layer inputs), "dots" (matmul outputs), "dots_no_batch" (weight-only matmuls).
    `attention` = "dense" materialises [q, k] scores; "chunked" processes `attention_chunk`
    queries at a time so long sequences fit in memory. Without a KV cache, "dense" splits the
    queries into causal blocks of `attention_block` (at most 8 blocks, each longer if needed)
    that skip the keys after their last query.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "dense"
    attention_chunk: int = 512
    attention_block: int = 128
    head_dropout: float = 0.5
    head_grad_scale: float = 1e-4

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads="
                    f"{self.num_heads}; set head_dim explicitly."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the field and the fix for an inconsistent config."""
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
            "attention_chunk",
            "attention_block",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)."
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE.")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r}; choose one of {sorted(DTYPES)}."
                )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; choose one of {REMAT_POLICIES}.")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention={self.attention!r}; choose one of {ATTENTION_IMPLS}."
            )
        if self.rope_theta <= 0 or self.rope_scaling_factor <= 0:
            raise ValueError("ModelConfig.rope_theta and rope_scaling_factor must be > 0.")
        if self.rms_norm_eps <= 0:
            raise ValueError("ModelConfig.rms_norm_eps must be > 0.")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"ModelConfig.head_dropout={self.head_dropout} must be in [0, 1).")

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (validated).

        A head_dim that was derived as hidden_size // num_heads is derived again when either
        changes (unless head_dim itself is given).
        """
        derived = self.head_dim * self.num_heads == self.hidden_size
        if derived and "head_dim" not in changes and {"hidden_size", "num_heads"} & set(changes):
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from `to_dict` output; unknown keys raise a clear error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown ModelConfig field(s) {unknown}; known: {sorted(known)}.")
        return cls(**d)

    def num_params(self, include_head: bool = True) -> int:
        """Parameter count (embeddings counted once when tied)."""
        c, d = self.hidden_size, self.head_dim
        attn = c * d * (self.num_heads + 2 * self.num_kv_heads)
        attn += d * (self.num_heads + 2 * self.num_kv_heads)  # q/k/v biases
        attn += self.num_heads * d * c
        mlp = 3 * c * self.intermediate_size
        layer = attn + mlp + 2 * c
        total = self.num_layers * layer + self.vocab_size * c + c
        if not self.tie_word_embeddings:
            total += self.vocab_size * c
        if include_head:
            total += 2 * c * c + 4 * c + 1
        return total
