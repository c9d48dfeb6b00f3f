"""The Qwen2 decoder in Flax NNX: GQA attention with q/k/v biases, split-half RoPE, RMSNorm, SwiGLU.

All layers but the last are stacked along a leading `layers` axis and run under `jax.lax.scan`
(with the configured remat policy); the last layer is kept apart so that its input, the
PENULTIMATE hidden state that the SPRM head reads (HF `hidden_states[-2]`), comes out of the
forward pass for free.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from msjax.models.config import ModelConfig
from msjax.models.kv_cache import KVCache
from msjax.sharding import constrain, spec_on_mesh

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
# Causal query blocks of dense attention are unrolled: this bounds the program size.
MAX_CAUSAL_BLOCKS = 8


def _param(rngs: nnx.Rngs, shape, axes, dtype, stddev: float) -> nnx.Param:
    value = stddev * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


def _zeros(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 (Qwen2RMSNorm)."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> same shape and dtype."""
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (self.scale.value.astype(jnp.float32) * y).astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, scaling: float = 1.0):
    """Split-half RoPE tables: positions int32[batch, seq] -> cos, sin f32[batch, seq, head_dim]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = (positions.astype(jnp.float32) / scaling)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, head_dim] (rotate_half form)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """What a query may attend to.

    key_valid: bool[batch, keys] marks real (non-padding) key slots; q_offset: int32[] (or
    int32[batch], one per row) is the key slot of the first query (0 without a cache, the cache
    write index with one). Query i may attend key j iff j <= q_offset + i and key_valid[j].
    """

    key_valid: jax.Array
    q_offset: jax.Array

    def block(self, q_start, q_len: int) -> jax.Array:
        """bool[batch, 1, 1, q_len, keys] for queries q_start .. q_start + q_len - 1."""
        keys = self.key_valid.shape[1]
        q_idx = jnp.reshape(self.q_offset, (-1, 1)) + q_start + jnp.arange(q_len)  # [1|b, q]
        causal = jnp.arange(keys)[None, None, :] <= q_idx[:, :, None]
        return (causal & self.key_valid[:, None, :])[:, None, None]


def _attend(q, k, v, allowed, scale):
    """q: [b, kv, g, t, d], k/v: [b, kv, s, d], allowed: bool[b, 1, 1, t, s] -> [b, kv, g, t, d].

    Heads lead so that both matmuls are plain batched matmuls over [g * t, s] scores (no
    transpose of the scores). A query that may see no key at all (a left-padding position)
    gets output 0, whatever the block of keys it was given.
    """
    b, kv, g, t, d = q.shape
    scores = jnp.einsum(
        "bkqd,bksd->bkqs", q.reshape(b, kv, g * t, d), k, preferred_element_type=jnp.float32
    )
    # An additive bias on the small [b, 1, 1, t, s] mask instead of a select on the full scores:
    # |score| is far below the spacing of floats near NEG_INF, so a masked score becomes
    # exactly NEG_INF, and the backward pass needs neither the mask nor a select.
    scores = scores.reshape(b, kv, g, t, -1) * scale + jnp.where(allowed, 0.0, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, kv, g * t, -1), v)
    return jnp.where(jnp.any(allowed, axis=-1, keepdims=True), out.reshape(q.shape), 0)


_attend_remat = jax.checkpoint(_attend, static_argnums=(4,))


class Attention(nnx.Module):
    """Grouped-query self-attention with q/k/v biases and no output bias."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        c, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd, std = cfg.jnp_param_dtype, cfg.initializer_range
        self.q_kernel = _param(rngs, (c, h, d), ("embed", "heads", "head_dim"), pd, std)
        self.q_bias = _zeros((h, d), ("heads", "head_dim"), pd)
        self.k_kernel = _param(rngs, (c, kv, d), ("embed", "kv_heads", "head_dim"), pd, std)
        self.k_bias = _zeros((kv, d), ("kv_heads", "head_dim"), pd)
        self.v_kernel = _param(rngs, (c, kv, d), ("embed", "kv_heads", "head_dim"), pd, std)
        self.v_bias = _zeros((kv, d), ("kv_heads", "head_dim"), pd)
        self.o_kernel = _param(rngs, (h, d, c), ("heads", "head_dim", "embed"), pd, std)
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask: AttentionMask, kv_write=None):
        """Attention over this call's keys, or over a cache.

        Args:
          x: [batch, seq, embed]; cos/sin: [batch, seq, head_dim] RoPE tables.
          mask: which key slots each query may see.
          kv_write: None (keys = this call's keys), or a function (k, v) -> (keys, values,
            state) that stores k/v [batch, seq, kv_heads, head_dim] into a cache and returns
            the cached keys/values [batch, kv_heads, cache_len, head_dim] plus the new cache.
        Returns (y: [batch, seq, embed], state from kv_write or None).
        """
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        x = x.astype(dt)

        b, t, c = x.shape
        rows = x.reshape(b * t, c)

        def proj(kernel, bias):
            # A 2-D [b * t, c] @ [c, heads * head_dim] matmul (see MLP).
            w = kernel.value.astype(dt)
            y = (rows @ w.reshape(c, -1)).reshape(b, t, *w.shape[1:])
            return y + bias.value.astype(dt)

        q = constrain(apply_rope(proj(self.q_kernel, self.q_bias), cos, sin), _Q_AXES)
        k = constrain(apply_rope(proj(self.k_kernel, self.k_bias), cos, sin), _KV_AXES)
        v = constrain(proj(self.v_kernel, self.v_bias), _KV_AXES)
        state = None
        if kv_write is not None:
            k, v, state = kv_write(k, v)
        q = q.reshape(b, t, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
        out = _attention(q, k.astype(dt), v.astype(dt), mask, cfg, causal_self=kv_write is None)
        out = out.reshape(b * t, cfg.num_heads * cfg.head_dim)
        o = self.o_kernel.value.astype(dt).reshape(cfg.num_heads * cfg.head_dim, c)
        return (out @ o).reshape(b, t, c), state


_Q_AXES = ("batch", "seq", "act_heads", None)
_KV_AXES = ("batch", "seq", "act_kv_heads", None)


def _attention(q, k, v, mask: AttentionMask, cfg: ModelConfig, causal_self: bool):
    """q: [b, t, kv, g, d]; k/v: [b, s, kv, d] (this call's own keys, `causal_self`) or
    [b, kv, s, d] (a cache's layout) -> [b, t, kv, g, d].

    "chunked" runs blocks of `attention_chunk` queries one at a time (each rematerialised in the
    backward pass), so only [chunk, s] scores are live instead of [t, s]. "dense" on this call's
    own keys (`causal_self`: no cache, query i is key i) splits the queries into blocks of
    `attention_block` (at most MAX_CAUSAL_BLOCKS) and gives each block only the keys up to its
    last query: the masked upper triangle is mostly skipped (n blocks do (n + 1) / 2n of the
    work) and the score blocks are smaller. With a cache every query sees the whole cache.
    Dense blocks are rematerialised too: the backward pass recomputes scores and probabilities
    from q/k/v instead of keeping [t, s] arrays per layer (less memory, and on XLA:CPU faster than
    zero-filling and reading back the scan's stacked residuals).
    """
    scale = 1.0 / math.sqrt(cfg.head_dim)
    b, t = q.shape[:2]
    q = q.transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
    if causal_self:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, s, d]
    chunk = cfg.attention_chunk
    if cfg.attention == "chunked" and t > chunk:
        n = -(-t // chunk)
        qp = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, n * chunk - t), (0, 0)))
        blocks = jnp.moveaxis(qp.reshape(*q.shape[:3], n, chunk, q.shape[-1]), 3, 0)

        @jax.checkpoint
        def one(args):
            i, qc = args
            return _attend(qc, k, v, mask.block(i * chunk, chunk), scale)

        out = jnp.moveaxis(jax.lax.map(one, (jnp.arange(n), blocks)), 0, 3)
        out = out.reshape(*q.shape[:3], n * chunk, q.shape[-1])[:, :, :, :t]
    elif causal_self and t > cfg.attention_block:
        n = min(-(-t // cfg.attention_block), MAX_CAUSAL_BLOCKS)
        bounds = [t * i // n for i in range(n + 1)]
        out = jnp.concatenate(
            [
                _attend_remat(
                    q[:, :, :, lo:hi],
                    k[:, :, :hi],
                    v[:, :, :hi],
                    mask.block(lo, hi - lo)[..., :hi],
                    scale,
                )
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            ],
            axis=3,
        )
    else:
        out = _attend_remat(q, k, v, mask.block(0, t), scale)
    return out.transpose(0, 3, 1, 2, 4)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        c, m = cfg.hidden_size, cfg.intermediate_size
        pd, std = cfg.jnp_param_dtype, cfg.initializer_range
        self.gate_kernel = _param(rngs, (c, m), ("embed", "mlp"), pd, std)
        self.up_kernel = _param(rngs, (c, m), ("embed", "mlp"), pd, std)
        self.down_kernel = _param(rngs, (m, c), ("mlp", "embed"), pd, std)
        self.dtype = cfg.jnp_dtype

    def __call__(self, x):
        """x: [batch, seq, embed] -> [batch, seq, embed].

        The matmuls run on [batch * seq, ...] rows: the same products, but XLA:CPU computes the
        weight gradients of 2-D matmuls far faster than those of batched 3-D ones.
        """
        dt = self.dtype
        b, t, c = x.shape
        x = x.astype(dt).reshape(b * t, c)
        gate = x @ self.gate_kernel.value.astype(dt)
        up = x @ self.up_kernel.value.astype(dt)
        h = jax.nn.silu(gate) * up
        h = constrain(h.reshape(b, t, -1), ("batch", "seq", "mlp")).reshape(b * t, -1)
        return (h @ self.down_kernel.value.astype(dt)).reshape(b, t, -1)


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, cos, sin, mask: AttentionMask, kv_write=None):
        """x: [batch, seq, embed] -> (x, cache state), see `Attention`."""
        h, state = self.attn(self.input_norm(x), cos, sin, mask, kv_write)
        x = x + h.astype(x.dtype)
        x = x + self.mlp(self.post_attn_norm(x)).astype(x.dtype)
        return constrain(x, ("batch", "seq", "act_embed")), state


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _make_stack(cfg: ModelConfig, rngs: nnx.Rngs, n: int):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(
        in_axes=(0,),
        out_axes=0,
        transform_metadata={nnx.PARTITION_NAME: "layers", "axes": "layers"},
    )
    def make(r):
        return DecoderLayer(cfg, r)

    return make(rngs)


class Qwen2(nnx.Module):
    """The Qwen2 decoder: embeddings, `num_layers` blocks, final RMSNorm, (tied) LM head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd, std = cfg.jnp_param_dtype, cfg.initializer_range
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, std)
        self.layers = _make_stack(cfg, rngs, cfg.num_layers - 1) if cfg.num_layers > 1 else None
        self.last_layer = DecoderLayer(cfg, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, std
            )

    def unembedding(self) -> jax.Array:
        """The LM-head matrix [embed, vocab] (the transposed embedding table when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed.value.T
        return self.lm_head.value

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [batch, seq, embed] (final-normed) -> f32[batch, seq, vocab]."""
        w = self.unembedding().astype(self.cfg.jnp_dtype)
        out = jnp.einsum(
            "btc,cv->btv", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32
        )
        return constrain(out, ("batch", "seq", "act_vocab"))

    def __call__(
        self,
        tokens,
        positions,
        key_valid=None,
        cache: KVCache | None = None,
        cache_index=None,
        *,
        sharded_lookup: bool = False,
    ):
        """Runs the decoder.

        Args:
          tokens: int32[batch, seq].
          positions: int32[batch, seq] RoPE positions.
          key_valid: bool[batch, keys] real key slots (keys = seq without a cache, the cache
            length with one); None = all valid.
          cache: optional KVCache; this call's keys/values are written at `cache_index`.
          cache_index: int32[] write index into the cache (required with a cache), or int32[batch]
            one per row (the continuous engine's slots; writes past the cache's end are
            dropped).
          sharded_lookup: look tokens up in the table's own fsdp shards (`embed_lookup`), for
            parameters in the training layout: the table's gradient then stays in its shards.
            False (the decode layout, whose table is not split over fsdp): gather the table.
        Returns:
          (hidden [batch, seq, embed] after the final norm, penultimate [batch, seq, embed]
          = input of the last layer, updated KVCache or None).
        """
        cfg = self.cfg
        b, t = tokens.shape
        if cache is None:
            key_valid = jnp.ones((b, t), bool) if key_valid is None else key_valid
            mask = AttentionMask(key_valid.astype(bool), jnp.asarray(0, jnp.int32))
        else:
            if cache_index is None:
                raise ValueError("cache_index is required when a KV cache is given.")
            if key_valid is None:
                key_valid = jnp.ones((b, cache.max_len), bool)
            mask = AttentionMask(key_valid.astype(bool), jnp.asarray(cache_index, jnp.int32))
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor)
        if sharded_lookup:
            x = embed_lookup(self.embed.value, tokens, cfg.jnp_dtype)
        else:
            # Gather from a table all-gathered over fsdp (vocab stays split over tensor): a
            # gather from an embed-sharded table makes GSPMD replicate its output.
            table = constrain(self.embed.value, ("vocab", None))
            x = jnp.take(table, tokens, axis=0).astype(cfg.jnp_dtype)
        x = constrain(x, ("batch", "seq", "act_embed"))

        if self.layers is not None:
            x, cache = self._scan(x, cos, sin, mask, cache)
        penultimate = x
        write = None if cache is None else _cache_writer(cache, cfg.num_layers - 1, mask.q_offset)
        x, cache = self.last_layer(x, cos, sin, mask, write)
        return self.final_norm(x), penultimate, cache

    def _scan(self, x, cos, sin, mask, cache):
        graphdef, state = nnx.split(self.layers)

        def body(carry, layer_state):
            x, cache, i = carry
            layer = nnx.merge(graphdef, layer_state)
            write = None if cache is None else _cache_writer(cache, i, mask.q_offset)
            x, cache = layer(x, cos, sin, mask, write)
            return (x, cache, i + 1), None

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT[self.cfg.remat], prevent_cse=False)
        (x, cache, _), _ = jax.lax.scan(body, (x, cache, jnp.asarray(0, jnp.int32)), state)
        return x, cache


def embed_lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """Embedding rows of `tokens` from a table in the training layout, never gathering the table.

    table: [vocab, embed] with vocab split over tensor and embed over fsdp; tokens: int32[batch,
    seq] split over (data, fsdp) -> [batch, seq, embed] in `dtype`, split over (data, fsdp).
    Each device looks up the tokens of all rows of its fsdp group in its own [vocab / tensor,
    embed / fsdp] block (a token outside the block's vocab range gives 0, and a sum over tensor
    adds the blocks), then an all-to-all over fsdp hands every device its own rows with all embed
    columns. The backward pass is that all-to-all (activation-sized) and a scatter-add into the
    device's own block: the table's gradient is formed in its shards, never at full size (only
    summed over data, whose devices hold the same block). Without a mesh (or with fsdp = 1) it
    is a plain `take`. Out-of-range ids give 0 here (a plain `take` gives NaN).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("fsdp", 1) == 1:
        return jnp.take(table, tokens, axis=0).astype(dtype)
    table_spec = spec_on_mesh(("vocab", "embed"), mesh)
    rows_spec = spec_on_mesh(("batch", None), mesh)
    tensor = table_spec[0]

    def local(block, ids):
        ids = jax.lax.all_gather(ids, "fsdp", axis=0, tiled=True)  # all rows of the fsdp group
        if tensor is not None:
            ids = ids - jax.lax.axis_index(tensor) * block.shape[0]
        inside = (ids >= 0) & (ids < block.shape[0])
        x = jnp.take(block, jnp.where(inside, ids, 0), axis=0)
        x = jnp.where(inside[..., None], x, 0).astype(dtype)  # [rows of the group, seq, embed/f]
        if tensor is not None:
            x = jax.lax.psum(x, tensor)  # one block holds each id: exact in any dtype
        return jax.lax.all_to_all(x, "fsdp", 0, 2, tiled=True)  # own rows, all embed columns

    return jax.shard_map(
        local, mesh=mesh, in_specs=(table_spec, rows_spec), out_specs=jax.P(*rows_spec, None)
    )(table, tokens)


def _cache_writer(cache: KVCache, layer, index):
    """A `kv_write` that stores k/v of `layer` at slot `index` (int32[] or int32[batch]) of the
    whole-stack cache in place."""

    def write(k, v):
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)  # [b, t, kv, d]
        if jnp.ndim(index) == 0:
            start = (layer, 0, 0, index, 0)
            ck = jax.lax.dynamic_update_slice(cache.k, k.transpose(0, 2, 1, 3)[None], start)
            cv = jax.lax.dynamic_update_slice(cache.v, v.transpose(0, 2, 1, 3)[None], start)
        else:
            rows = jnp.arange(k.shape[0])[:, None]
            cols = index[:, None] + jnp.arange(k.shape[1])[None, :]
            # Advanced indices split by a slice: the update is indexed [b, t, kv, d].
            ck = cache.k.at[layer, rows, :, cols].set(k, mode="drop")
            cv = cache.v.at[layer, rows, :, cols].set(v, mode="drop")
        return ck[layer], cv[layer], KVCache(ck, cv)

    return write
