"""`ReflectiveModel`: one Qwen2 backbone that is both the policy and, via the SPRM head, the PRM."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from msjax.models.config import ModelConfig
from msjax.models.kv_cache import KVCache
from msjax.models.qwen2 import Qwen2
from msjax.models.sprm import SPRMHead


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """logits: f32[batch, seq, vocab] or None; hidden: final-normed [batch, seq, embed];
    penultimate: [batch, seq, embed] (SPRM input); cache: updated KVCache or None."""

    logits: jax.Array | None
    hidden: jax.Array
    penultimate: jax.Array
    cache: KVCache | None


class ReflectiveModel(nnx.Module):
    """Backbone (`self.backbone`, a Qwen2 decoder) + SPRM head (`self.head`), one parameter tree."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.backbone = Qwen2(cfg, rngs)
        self.head = SPRMHead(
            cfg.hidden_size,
            rngs=rngs,
            dropout=cfg.head_dropout,
            grad_scale=cfg.head_grad_scale,
            param_dtype=cfg.jnp_param_dtype,
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        key_valid: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """tokens, positions: int32[batch, seq]; see `Qwen2.__call__` for the mask and cache."""
        hidden, penultimate, cache = self.backbone(tokens, positions, key_valid, cache, cache_index)
        logits = self.backbone.logits(hidden) if compute_logits else None
        return ModelOutput(logits, hidden, penultimate, cache)

    def step_logits(
        self, penultimate: jax.Array, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """penultimate: [..., embed] -> f32[...] SPRM logits (dropout only with a dropout_rng)."""
        return self.head(penultimate, dropout_rng)


def abstract_model(cfg: ModelConfig, mesh=None, rules=None):
    """(graphdef, abstract state) without allocating; with a mesh, leaves carry shardings.

    The abstract state is an nnx.State of Params holding jax.ShapeDtypeStruct values, usable for
    AOT compilation and as an orbax restore target.
    """
    from msjax import sharding as sh

    rules = sh.RULES if rules is None else rules
    abstract = nnx.eval_shape(lambda: ReflectiveModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        sh.check_divisible(state, mesh, rules)
        shardings = sh.state_shardings(state, mesh, rules)
        state = jax.tree.map(
            lambda v, s: v.replace(
                jax.ShapeDtypeStruct(v.value.shape, v.value.dtype, sharding=s.value)
            ),
            state,
            shardings,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    return graphdef, state


def create_model(cfg: ModelConfig, mesh=None, seed: int = 0, rules=None) -> ReflectiveModel:
    """A randomly initialised model; with a mesh its parameters are created already sharded.

    Initialisation runs under `jax.jit` with the parameter shardings as `out_shardings`, so no
    device ever holds an unsharded copy. Raises ValueError (before compiling) when a mesh axis
    does not divide a parameter dimension.
    """
    if mesh is None:
        return ReflectiveModel(cfg, rngs=nnx.Rngs(seed))
    from msjax import sharding as sh

    rules = sh.RULES if rules is None else rules
    graphdef, abstract = abstract_model(cfg, mesh, rules)
    shardings = sh.state_shardings(abstract, mesh, rules)

    def init():
        return nnx.state(ReflectiveModel(cfg, rngs=nnx.Rngs(seed)))

    return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())
