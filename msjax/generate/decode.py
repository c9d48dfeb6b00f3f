"""The compiled decode program: prefill, the `lax.while_loop` decode step, and the per-row records
(sampling, EOS / stop sequences, streamed SPRM steps, pruning) it keeps.

A `DecodeProgram` is a frozen, hashable description (graph, configs, mesh, samples per prompt);
`prefill` and `decode` below are jitted with it as a static argument, so every Sampler built with
equal settings shares one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from msjax import sharding as sh
from msjax.generate import steps as st
from msjax.generate.config import EOS, LENGTH, PRUNED, RUNNING, STOP, SamplerConfig
from msjax.generate.pruning import prune_decision
from msjax.generate.sampling import (
    apply_repetition_penalty,
    mark_seen,
    row_keys,
    sample_next,
    token_logprob,
)
from msjax.models.config import ModelConfig
from msjax.models.kv_cache import CACHE_AXES, KVCache

_ROW = ("batch",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The while-loop carry (rows = prompts * n, padded to the batch shards; N = max_new_tokens).

    cache: KVCache over prompt bucket L + N slots; token: int32[rows] last sampled token (the
    next forward's input); prompt_len: int32[rows]; real: bool[rows] (False: batch padding);
    step: int32[] tokens generated so far; done: bool[rows]; finish: int32[rows] reason codes;
    length: int32[rows]; tokens: int32[rows, N]; logprobs: f32[rows, N]; recent: int32[rows, W]
    last W generated tokens (stop-sequence window); keys: uint32[rows, 2] per-row key data;
    steps: streaming step bookkeeping; seen: bool[rows, vocab] tokens in the prompt or output
    (None without a repetition penalty).
    """

    cache: KVCache
    token: jax.Array
    prompt_len: jax.Array
    real: jax.Array
    step: jax.Array
    done: jax.Array
    finish: jax.Array
    length: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    recent: jax.Array
    keys: jax.Array
    steps: st.StepState
    seen: jax.Array | None


def _repeat(x: jax.Array, n: int, axis: int) -> jax.Array:
    """Each entry of `axis` n times in a row (jnp.repeat), as a broadcast + reshape."""
    x = jnp.expand_dims(x, axis + 1)
    x = jnp.broadcast_to(x, x.shape[: axis + 1] + (n,) + x.shape[axis + 2 :])
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


@dataclasses.dataclass(frozen=True)
class DecodeProgram:
    """What fixes the compiled program: model graph and config, sampler config, mesh (or None)
    and n, the samples per prompt (the pruning groups)."""

    graphdef: Any
    cfg: ModelConfig
    config: SamplerConfig
    mesh: Any
    n: int

    def _is_step(self) -> jax.Array:
        return (
            jnp.zeros((self.cfg.vocab_size,), bool).at[jnp.asarray(self.config.step_ids)].set(True)
        )

    def _constrain(self, s: DecodeState) -> DecodeState:
        rows = lambda x: sh.constrain(x, _ROW + (None,) * (x.ndim - 1))
        cache = None
        if s.cache is not None:
            cache = KVCache(
                sh.constrain(s.cache.k, CACHE_AXES), sh.constrain(s.cache.v, CACHE_AXES)
            )
        others = jax.tree.map(rows, dataclasses.replace(s, cache=None, step=None))
        return dataclasses.replace(others, cache=cache, step=s.step)

    def prefill(self, params, prompt, prompt_len, source, real, row_ids, key):
        """prompt: int32[B, L] left-padded; source: int32[rows] prompt of each row (rows of
        real prompts must be source = r // n); real: bool[rows] (False: batch padding);
        row_ids: int32[rows] randomness ids.

        Returns (KVCache over L + max_new_tokens slots, DecodeState without its cache).
        """
        c, cfg = self.config, self.cfg
        model = nnx.merge(self.graphdef, params)
        b, length = prompt.shape
        valid = jnp.arange(length)[None, :] >= (length - prompt_len)[:, None]
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
        out = model(
            prompt,
            positions,
            valid,
            cache=KVCache.zeros(cfg, b, length),
            cache_index=jnp.asarray(0, jnp.int32),
            compute_logits=False,
        )
        logits = model.backbone.logits(out.hidden[:, -1:])[:, 0]
        rows = source.shape[0]
        if rows == b * self.n:
            # Row r is prompt r // n (padding rows only copy padding): repeat without a gather,
            # so each device expands its own prompts (a gather would all-gather the cache).
            take = lambda x, axis=0: _repeat(x, self.n, axis)
        else:
            take = lambda x, axis=0: jnp.take(x, source, axis=axis)
        pad = ((0, 0), (0, 0), (0, 0), (0, c.max_new_tokens), (0, 0))
        cache = KVCache(jnp.pad(take(out.cache.k, 1), pad), jnp.pad(take(out.cache.v, 1), pad))
        row_prompt, row_valid = take(prompt), take(valid)
        keys = row_keys(key, row_ids)
        window = max((len(s) for s in c.stop_sequences), default=0)
        state = DecodeState(
            cache=cache,
            token=row_prompt[:, -1],
            prompt_len=take(prompt_len),
            real=real,
            step=jnp.asarray(0, jnp.int32),
            done=~real,
            finish=jnp.full((rows,), RUNNING, jnp.int32),
            length=jnp.zeros((rows,), jnp.int32),
            tokens=jnp.full((rows, c.max_new_tokens), c.pad_id, jnp.int32),
            logprobs=jnp.zeros((rows, c.max_new_tokens), jnp.float32),
            recent=jnp.full((rows, window), -1, jnp.int32),
            keys=jax.random.key_data(keys),
            steps=st.init_step_state(
                row_prompt,
                row_valid,
                c.step_capacity if c.score_steps else 0,
                c.think_start_id,
                c.think_end_id,
            ),
            seen=None,
        )
        if c.repetition_penalty != 1.0:
            seen = jnp.zeros((rows, cfg.vocab_size), bool)
            state = dataclasses.replace(state, seen=mark_seen(seen, row_prompt, row_valid))
        state = self._constrain(state)
        hidden = take(out.penultimate[:, -1])
        state = self._constrain(self._advance(model, state, take(logits), hidden))
        return state.cache, dataclasses.replace(state, cache=None)

    def _advance(self, model, s: DecodeState, logits, hidden) -> DecodeState:
        """Samples token `s.step` from logits f32[rows, vocab] of the forward of `s.token`
        (whose penultimate state is hidden [rows, embed]) and updates every per-row record."""
        c = self.config
        i = s.step
        live = ~s.done
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(jax.random.wrap_key_data(s.keys), i)
        seen = s.seen
        if seen is None:
            y, logp = sample_next(
                logits, keys, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k
            )
        else:
            penalised = apply_repetition_penalty(logits, seen, c.repetition_penalty)
            y, _ = sample_next(
                penalised, keys, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k
            )
            logp = token_logprob(logits, y, c.temperature)
            seen = mark_seen(seen, y[:, None], live[:, None])
        y = jnp.where(live, y, c.pad_id)
        logp = jnp.where(live, logp, 0.0)
        steps = s.steps
        if c.score_steps:
            prev_pos = s.prompt_len + i - 1
            cand = live & st.is_candidate(s.token, y, self._is_step(), c.think_start_id)
            step_logit = jax.lax.cond(
                jnp.any(cand),
                lambda h: model.step_logits(h),
                lambda h: jnp.zeros(h.shape[:1], jnp.float32),
                hidden,
            )
            steps = st.record(steps, cand, step_logit, prev_pos)
            steps = st.observe_tags(steps, y, prev_pos + 1, live, c.think_start_id, c.think_end_id)
        recent = s.recent
        stop = jnp.zeros_like(live)
        if c.stop_sequences:
            recent = jnp.concatenate([recent[:, 1:], y[:, None]], axis=1)
            for seq in c.stop_sequences:
                tail = recent[:, recent.shape[1] - len(seq) :]
                stop |= jnp.all(tail == jnp.asarray(seq, jnp.int32)[None, :], axis=1)
        eos = jnp.zeros_like(live)
        if c.eos_ids:
            eos = live & jnp.isin(y, jnp.asarray(c.eos_ids, jnp.int32))
        stop = live & stop & ~eos
        last = live & ~eos & ~stop & (i + 1 >= c.max_new_tokens)
        finish = jnp.where(eos, EOS, jnp.where(stop, STOP, jnp.where(last, LENGTH, s.finish)))
        s = dataclasses.replace(
            s,
            token=y,
            step=i + 1,
            done=s.done | eos | stop | last,
            finish=finish.astype(jnp.int32),
            length=jnp.where(live, i + 1, s.length),
            tokens=jax.lax.dynamic_update_slice(s.tokens, y[:, None], (0, i)),
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, logp[:, None], (0, i)),
            recent=recent,
            steps=steps,
            seen=seen,
        )
        if c.prune is not None:
            s = jax.lax.cond((i + 1) % c.prune.every == 0, self._prune, lambda s: s, s)
        return s

    def _prune(self, s: DecodeState) -> DecodeState:
        scores, num = st.running_scores(s.steps)
        active = s.real & (s.finish != PRUNED)
        drop = prune_decision(self.config.prune, scores, num, ~s.done, active, self.n)
        return dataclasses.replace(
            s, done=s.done | drop, finish=jnp.where(drop, PRUNED, s.finish).astype(jnp.int32)
        )

    def decode(self, params, cache: KVCache, state: DecodeState):
        """Runs the loop until every row is done; returns (outputs dict, final cache)."""
        c = self.config
        model = nnx.merge(self.graphdef, params)
        state = dataclasses.replace(state, cache=cache)
        length = state.cache.max_len - c.max_new_tokens

        def body(s: DecodeState) -> DecodeState:
            i = s.step
            slots = jnp.arange(s.cache.max_len)[None, :]
            key_valid = slots >= (length - s.prompt_len)[:, None]
            out = model(
                s.token[:, None],
                (s.prompt_len + i - 1)[:, None],
                key_valid,
                cache=s.cache,
                cache_index=length + i - 1,
            )
            s = dataclasses.replace(s, cache=out.cache)
            return self._constrain(self._advance(model, s, out.logits[:, 0], out.penultimate[:, 0]))

        def cond(s: DecodeState):
            return (s.step < c.max_new_tokens) & ~jnp.all(s.done)

        s = jax.lax.while_loop(cond, body, self._constrain(state))
        scores, step_scores, positions, num = st.final_steps(s.steps, s.prompt_len + s.length)
        outputs = dict(
            tokens=s.tokens,
            logprobs=s.logprobs,
            lengths=s.length,
            finish=s.finish,
            prompt_lengths=s.prompt_len,
            scores=scores,
            step_scores=step_scores,
            step_positions=positions,
            num_steps=num,
        )
        return outputs, s.cache


prefill = jax.jit(DecodeProgram.prefill, static_argnums=0)
prefill.__doc__ = "Jitted `DecodeProgram.prefill(program, params, ...)`."
decode = jax.jit(DecodeProgram.decode, static_argnums=0, donate_argnums=2)
decode.__doc__ = (
    "Jitted `DecodeProgram.decode(program, params, cache, state)`; the cache is donated and "
    "returned so the loop updates it in place."
)
