"""Choosing the next token: repetition penalty, greedy, temperature, top-k, top-p; and the
log-prob that goes with it.

The returned log-prob is log softmax(logits / T)[token] with T = temperature (T = 1 for greedy),
WITHOUT the top-k/top-p renormalisation and without the repetition penalty: it is exactly what a
training forward pass recomputes from the same logits, so GRPO's old and new log-probs are
comparable.

`sample_next` takes static settings (the fixed-batch Sampler); `sample_rows` takes them per row
(the continuous engine, where requests with different settings share one program) and draws the
same token as `sample_next` for the same key and settings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(key: jax.Array, row_ids: jax.Array) -> jax.Array:
    """One key per sequence: fold_in(key, row id). key: a typed PRNG key; row_ids: int32[rows].

    Keys depend only on the row's index, not on how the batch is sharded.
    """
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, row_ids)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """vLLM's repetition penalty: the logit of every token already seen (in the prompt or the
    output) is divided by the penalty when positive and multiplied by it otherwise.

    logits: f32[rows, vocab]; seen: bool[rows, vocab]; penalty: float or f32[rows] (> 0, 1 = off).
    """
    p = jnp.asarray(penalty, jnp.float32)
    p = p[:, None] if p.ndim == 1 else p
    return jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)


def mark_seen(seen: jax.Array, tokens: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """seen bool[rows, vocab] with tokens int32[rows, t] (where bool[rows, t], default all) set."""
    rows = jnp.arange(seen.shape[0])[:, None]
    hit = jnp.ones(tokens.shape, bool) if where is None else where
    return seen.at[rows, tokens].max(hit)


def token_logprob(logits: jax.Array, tokens: jax.Array, temperature) -> jax.Array:
    """f32[rows]: log softmax(logits / T)[token] (T = 1 where temperature is 0).

    logits: f32[rows, vocab]; tokens: int32[rows]; temperature: float or f32[rows].
    """
    t = jnp.asarray(temperature, jnp.float32)
    t = jnp.where(t > 0, t, 1.0)
    scaled = logits.astype(jnp.float32) / (t[:, None] if t.ndim == 1 else t)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


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


def sample_rows(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """Picks one token per row with per-row settings; the same draw as `sample_next` would make
    for each row's settings and key.

    Args:
      logits: f32[rows, vocab]; keys: typed PRNG keys [rows];
      temperature: f32[rows] (0 = greedy); top_k: int32[rows] (0 = off); top_p: f32[rows].
    Returns tokens int32[rows]. The full sort that top-k/top-p need runs only when some row
    filters (`lax.cond`).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    filters = ~greedy & ((top_k > 0) | (top_p < 1.0))

    def plain(scaled):
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    def filtered(scaled):
        values, ids = jax.lax.top_k(scaled, vocab)  # sorted, descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        values = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], values, -jnp.inf)
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
        values = jnp.where(keep, values, -jnp.inf)
        pick = jax.vmap(jax.random.categorical)(keys, values)
        picked = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(filters, picked, plain(scaled))

    sampled = jax.lax.cond(jnp.any(filters), filtered, plain, scaled)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), sampled)
