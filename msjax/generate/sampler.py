"""The rollout engine: jitted prefill + `lax.while_loop` decode over a donated KV cache, with the
SPRM step scores streamed out of the hidden states the decoder computes anyway.

    sampler = Sampler(model, model_cfg, SamplerConfig(...), mesh=None)   # once
    result = sampler(params, prompts, n=8, key=jax.random.key(0))      # every step, live params

`params` is the model's CURRENT nnx state (`nnx.split(model)[1]`, or the model itself); the sampler
keeps only the graph definition, never a copy of the weights. The n samples of prompt p are rows
p*n .. p*n+n-1 of the result. Row r draws its randomness from fold_in(fold_in(key, r), t) at
token t, so the output depends on (key, prompts, n) and not on the mesh the batch is sharded on.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from msjax import sharding as sh
from msjax.generate import steps as st
from msjax.generate.config import EOS, FINISH_REASONS, LENGTH, PRUNED, RUNNING, STOP, SamplerConfig
from msjax.generate.prompts import pack_prompts, prompt_lists
from msjax.generate.pruning import prune_decision
from msjax.generate.sampling import row_keys, sample_next
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
    steps: streaming step bookkeeping.
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    """Generated samples (rows = prompts * n; samples of one prompt are contiguous).

    tokens: int32[rows, N] generated ids, pad_id after the end (EOS / stop tokens included);
    logprobs: f32[rows, N] log softmax(logits / T)[token] (T = 1 when greedy; no top-k/top-p
      renormalisation; 0 after the end);
    lengths: int32[rows] generated tokens; finish: int32[rows] codes into FINISH_REASONS;
    prompt_lengths: int32[rows];
    scores: f32[rows] SPRM trajectory scores (geometric mean; 0 without steps);
    step_scores: f32[rows, S] sigmoid step scores in text order (0 after num_steps);
    step_positions: int32[rows, S] position, in prompt+response, of each scored token (-1 after);
    num_steps: int32[rows]; n: samples per prompt.
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finish: jax.Array
    prompt_lengths: jax.Array
    scores: jax.Array
    step_scores: jax.Array
    step_positions: jax.Array
    num_steps: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True), default=1)

    def to_host(self) -> SampleResult:
        """The same result with NumPy arrays (gathered from every process when multi-host)."""

        def get(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return np.asarray(multihost_utils.process_allgather(x, tiled=True))
            return np.asarray(x)

        return jax.tree.map(get, self)

    def finish_reasons(self) -> list[str]:
        """Finish reason names per row: "eos", "stop", "length" or "pruned"."""
        return [FINISH_REASONS[int(c)] for c in np.asarray(self.finish)]

    def response(self, row: int) -> list[int]:
        """The generated ids of `row` (without padding)."""
        return [int(t) for t in np.asarray(self.tokens[row])[: int(self.lengths[row])]]

    def steps(self, row: int) -> tuple[list[float], list[int]]:
        """(step scores, step positions) of `row`."""
        k = int(self.num_steps[row])
        scores = np.asarray(self.step_scores[row])[:k]
        positions = np.asarray(self.step_positions[row])[:k]
        return [float(s) for s in scores], [int(p) for p in positions]

    @property
    def tokens_generated(self) -> int:
        return int(np.asarray(self.lengths).sum())


class Sampler:
    """Jitted prefill + decode for a `ReflectiveModel` graph; call it with the live parameters.

    Args:
      model: a ReflectiveModel (only its graph definition is kept) or an nnx GraphDef.
      cfg: the model's ModelConfig. config: SamplerConfig. mesh: optional (data, fsdp, tensor)
        mesh; rows are sharded over data*fsdp and heads over tensor by `msjax.sharding.RULES`.
    """

    def __init__(self, model, cfg: ModelConfig, config: SamplerConfig, mesh=None):
        self.graphdef = model if isinstance(model, nnx.GraphDef) else nnx.graphdef(model)
        self.cfg = cfg
        self.config = config
        self.mesh = mesh
        ids = [*config.eos_ids, *config.step_ids, config.pad_id]
        ids += [t for s in config.stop_sequences for t in s]
        ids += [t for t in (config.think_start_id, config.think_end_id) if t is not None]
        bad = sorted({t for t in ids if t >= cfg.vocab_size})
        if bad:
            raise ValueError(
                f"SamplerConfig token ids {bad} are outside the model's vocabulary "
                f"[0, {cfg.vocab_size}); was the config built from this model's tokenizer?"
            )
        self._row_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("n",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("n",), donate_argnums=(1,))
        # The cache is donated to decode and comes back (dropped) so the loop updates it in place.

    # ----------------------------------------------------------------------------- public

    def __call__(self, params, prompts, *, n: int = 1, key, prompt_mask=None) -> SampleResult:
        """Generates n samples per prompt.

        Args:
          params: the model's current nnx.State (or the model itself).
          prompts: a list of token-id lists, or int32[batch, L] with `prompt_mask`
            bool[batch, L] (any padding side; None = all tokens real).
          n: samples per prompt (>= 1). key: a PRNG key (typed or raw uint32[2]).
        Returns a SampleResult of batch * n rows (device arrays; `.to_host()` for NumPy).
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} samples per prompt must be an int >= 1.")
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        c = self.config
        lists = prompt_lists(prompts, prompt_mask)
        tokens, lengths = pack_prompts(
            lists,
            buckets=c.prompt_buckets,
            pad_id=c.pad_id,
            vocab_size=self.cfg.vocab_size,
            max_total=self.cfg.max_position_embeddings,
            max_new_tokens=c.max_new_tokens,
            batch_multiple=self._row_shards,
        )
        rows_real = len(lists) * n
        rows = -(-rows_real // self._row_shards) * self._row_shards
        source = np.zeros((rows,), np.int32)
        source[:rows_real] = np.repeat(np.arange(len(lists)), n)
        real = np.arange(rows) < rows_real
        if not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
        with self._mesh_context():
            args = [self._put(x) for x in (tokens, lengths, source, real)]
            cache, state = self._prefill(params, *args, key, n=n)
            result, _ = self._decode(params, cache, state, n=n)
        if rows != rows_real:
            result = jax.tree.map(lambda x: x[:rows_real], result)
        return dataclasses.replace(result, n=n)

    # ----------------------------------------------------------------------------- internals

    def _mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        sharding = sh.batch_sharding(self.mesh, x.ndim)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

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

    def _prefill_impl(self, params, prompt, prompt_len, source, real, key, *, n):
        """prompt: int32[B, L] left-padded; source: int32[rows] prompt of each row.

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
        take = lambda x, axis=0: jnp.take(x, source, axis=axis)
        rows = source.shape[0]
        pad = ((0, 0), (0, 0), (0, c.max_new_tokens), (0, 0), (0, 0))
        cache = KVCache(jnp.pad(take(out.cache.k, 1), pad), jnp.pad(take(out.cache.v, 1), pad))
        row_prompt, row_valid = take(prompt), take(valid)
        keys = row_keys(key, jnp.arange(rows, dtype=jnp.int32))
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
        )
        state = self._constrain(state)
        hidden = take(out.penultimate[:, -1])
        state = self._constrain(self._advance(model, state, take(logits), hidden, n))
        return state.cache, dataclasses.replace(state, cache=None)

    def _advance(self, model, s: DecodeState, logits, hidden, n: int) -> DecodeState:
        """Samples token `s.step` from logits f32[rows, vocab] of the forward of `s.token`
        (whose penultimate state is hidden [rows, embed]) and updates every per-row record;
        n = samples per prompt (the pruning groups)."""
        c = self.config
        i = s.step
        live = ~s.done
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(jax.random.wrap_key_data(s.keys), i)
        y, logp = sample_next(logits, keys, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k)
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
        )
        if c.prune is not None:
            prune = lambda s: self._prune(s, n)
            s = jax.lax.cond((i + 1) % c.prune.every == 0, prune, lambda s: s, s)
        return s

    def _prune(self, s: DecodeState, n: int) -> DecodeState:
        scores, num = st.running_scores(s.steps)
        active = s.real & (s.finish != PRUNED)
        drop = prune_decision(self.config.prune, scores, num, ~s.done, active, n)
        return dataclasses.replace(
            s, done=s.done | drop, finish=jnp.where(drop, PRUNED, s.finish).astype(jnp.int32)
        )

    def _decode_impl(self, params, cache: KVCache, state: DecodeState, *, n):
        """Runs the loop until every row is done; returns (SampleResult, final cache)."""
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
            return self._constrain(
                self._advance(model, s, out.logits[:, 0], out.penultimate[:, 0], n)
            )

        def cond(s: DecodeState):
            return (s.step < c.max_new_tokens) & ~jnp.all(s.done)

        s = jax.lax.while_loop(cond, body, self._constrain(state))
        scores, step_scores, positions, num = st.final_steps(s.steps, s.prompt_len + s.length)
        result = SampleResult(
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
        return result, s.cache
