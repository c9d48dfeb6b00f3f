"""Choosing the next token: greedy, temperature, top-k, top-p; and the log-prob that goes with it.

The returned log-prob is log softmax(logits / T)[token] with T = temperature (T = 1 for greedy),
WITHOUT the top-k/top-p renormalisation: it is exactly what a training forward pass recomputes
from the same logits, so GRPO's old and new log-probs are comparable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(key: jax.Array, row_ids: jax.Array) -> jax.Array:
    """One key per sequence: fold_in(key, row id). key: a typed PRNG key; row_ids: int32[rows].

    Keys depend only on the row's index, not on how the batch is sharded.
    """
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)


def filtered_logits(logits: jax.Array, top_k: int, top_p: float):
    """Applies top-k then top-p to tempered logits f32[rows, vocab].

    Returns (values f32[rows, m], ids int32[rows, m]): candidate logits (-inf where dropped)
    and their token ids, m = top_k (or vocab when only top-p is on).
    """
    vocab = logits.shape[-1]
    k = vocab if top_k == 0 else min(top_k, vocab)
    values, ids = jax.lax.top_k(logits, k)  # sorted, descending
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    return values, ids.astype(jnp.int32)


def sample_next(
    logits: jax.Array,
    keys: jax.Array,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Picks one token per row.

    Args:
      logits: f32[rows, vocab]; keys: typed PRNG keys [rows] (ignored when greedy).
      temperature: 0 = greedy; top_p in (0, 1]; top_k >= 0 (0 = off). Static Python values.
    Returns (tokens int32[rows], logprobs f32[rows]); see the module docstring for the log-prob.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits
    else:
        scaled = logits / temperature
        if top_k == 0 and top_p >= 1.0:
            tokens = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        else:
            values, ids = filtered_logits(scaled, top_k, top_p)
            pick = jax.vmap(jax.random.categorical)(keys, values)
            tokens = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
