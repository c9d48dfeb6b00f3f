"""The continuous engine's compiled programs: a fixed number of decode SLOTS, each holding one
sample with its own position, KV-cache row and sampling settings.

    admit(program, params, cache, state, batch)   prefill new prompts into free slots
    run_chunk(program, params, cache, state, W, K)  up to K decode steps over KV slots [0, W)
    collect(program, state)                         the finished rows' outputs

A slot's text lives at cache slots [0, prompt_len + generated): the prompt at [0, prompt_len)
(no padding), each generated token right after. Prefill writes the prompt but its last token,
whose forward runs as the slot's first decode step (with the step's own KV write), so that step
samples token 0 from the last prompt token's logits exactly as the fixed-batch sampler's prefill
does, and the SPRM head sees the same penultimate state. A chunk attends only over the first W
key slots (a bucket covering the longest live text), so its cost follows the live lengths.

Sampling settings, stop sequences, the output limit and the PRNG key are per-slot values in the
state: requests with different settings share one compiled program per (W, K) and admit shape.
Sample j's token t is drawn from fold_in(fold_in(key, row_id), t), as in the `Sampler`.
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
    sample_rows,
    token_logprob,
)
from msjax.models.config import ModelConfig
from msjax.models.kv_cache import CACHE_AXES, KVCache

_ROW = ("batch",)
ANY_TOKEN = -2  # left padding of a stop sequence: matches anything


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PruneTable:
    """The last running score of every sample of every group in flight, so that a finished or
    pruned sample (whose slot may already hold another prompt) still counts for its group.

    [G, M] arrays (G = slots = most groups in flight, M = slots = largest n): score f32,
    num int32 scored steps, running bool, active bool (real and not pruned).
    """

    score: jax.Array
    num: jax.Array
    running: jax.Array
    active: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Per-slot decode state (S slots, T = max text length per slot).

    token: int32[S] next forward's input; pos: int32[S] its text position; prompt_len,
    gen (tokens generated), limit (most tokens this row may generate): int32[S];
    running: bool[S]; finish: int32[S] reason codes; tokens: int32[S, T]; logprobs: f32[S, T];
    recent: int32[S, Ls] last generated tokens; stops: int32[S, ns, Ls] right-aligned stop
    sequences (ANY_TOKEN before, all ANY_TOKEN = unused); temperature, top_p, penalty: f32[S];
    top_k: int32[S]; keys: uint32[S, 2]; steps: streamed SPRM steps; seen: bool[S, vocab];
    group, member: int32[S] pruning group and index in it; table: PruneTable or None.
    """

    token: jax.Array
    pos: jax.Array
    prompt_len: jax.Array
    gen: jax.Array
    limit: jax.Array
    running: jax.Array
    finish: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    recent: jax.Array
    stops: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    penalty: jax.Array
    keys: jax.Array
    steps: st.StepState
    seen: jax.Array
    group: jax.Array
    member: jax.Array
    table: PruneTable | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdmitBatch:
    """New prompts and the slots they go to (P prompts padded to a bucket, S row entries).

    prompts: int32[P, L] right-padded; prompt_len: int32[P]; slot: int32[S] destination slot
    of each new row (S = unused entry); source: int32[S] its prompt; limit: int32[S];
    temperature, top_p, penalty: f32[S]; top_k: int32[S]; base_keys: uint32[S, 2] request key
    data; row_id: int32[S]; stops: int32[S, ns, Ls]; group, member: int32[S].
    """

    prompts: jax.Array
    prompt_len: jax.Array
    slot: jax.Array
    source: jax.Array
    limit: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    penalty: jax.Array
    top_k: jax.Array
    base_keys: jax.Array
    row_id: jax.Array
    stops: jax.Array
    group: jax.Array
    member: jax.Array


@dataclasses.dataclass(frozen=True)
class SlotProgram:
    """What fixes the compiled programs: model graph and config, the engine-wide sampler
    settings (EOS, step ids, scoring, pruning), mesh, slot count, text length per slot and
    stop capacity (ns sequences of up to Ls tokens)."""

    graphdef: Any
    cfg: ModelConfig
    config: SamplerConfig
    mesh: Any
    slots: int
    max_len: int
    stop_count: int
    stop_len: int

    @property
    def step_capacity(self) -> int:
        return (self.max_len + 1) // 2 if self.config.score_steps else 0

    def _constrain(self, s: SlotState) -> SlotState:
        rows = lambda x: sh.constrain(x, _ROW + (None,) * (x.ndim - 1))
        return dataclasses.replace(
            jax.tree.map(rows, dataclasses.replace(s, table=None)), table=s.table
        )

    def init(self) -> tuple[KVCache, SlotState]:
        """An empty cache and a state whose slots are all free."""
        s, t, c = self.slots, self.max_len, self.config
        zi = lambda *shape: jnp.zeros(shape, jnp.int32)
        zf = lambda *shape: jnp.zeros(shape, jnp.float32)
        table = None
        if c.prune is not None:
            table = PruneTable(zf(s, s), zi(s, s), jnp.zeros((s, s), bool), jnp.zeros((s, s), bool))
        state = SlotState(
            token=zi(s),
            pos=zi(s),
            prompt_len=zi(s),
            gen=zi(s),
            limit=zi(s),
            running=jnp.zeros((s,), bool),
            finish=zi(s),
            tokens=jnp.full((s, t), c.pad_id, jnp.int32),
            logprobs=zf(s, t),
            recent=jnp.full((s, self.stop_len), -1, jnp.int32),
            stops=jnp.full((s, self.stop_count, self.stop_len), ANY_TOKEN, jnp.int32),
            temperature=zf(s),
            top_p=jnp.ones((s,), jnp.float32),
            top_k=zi(s),
            penalty=jnp.ones((s,), jnp.float32),
            keys=jnp.zeros((s, 2), jnp.uint32),
            steps=st.init_step_state(
                zi(s, 1), jnp.zeros((s, 1), bool), self.step_capacity, None, None
            ),
            seen=jnp.zeros((s, self.cfg.vocab_size), bool),
            group=zi(s),
            member=zi(s),
            table=table,
        )
        cache = KVCache.zeros(self.cfg, s, t)
        cache = KVCache(sh.constrain(cache.k, CACHE_AXES), sh.constrain(cache.v, CACHE_AXES))
        return cache, self._constrain(state)

    def admit(self, params, cache: KVCache, s: SlotState, b: AdmitBatch):
        """Prefills b's prompts (all tokens but the last) into their slots' cache rows and resets
        the slots' state. Returns (cache, state)."""
        c, cfg = self.config, self.cfg
        model = nnx.merge(self.graphdef, params)
        p, length = b.prompts.shape
        idx = jnp.arange(length)[None, :]
        positions = jnp.broadcast_to(idx, (p, length)).astype(jnp.int32)
        out = model(
            b.prompts,
            positions,
            idx < (b.prompt_len - 1)[:, None],
            cache=KVCache.zeros(cfg, p, length),
            cache_index=jnp.asarray(0, jnp.int32),
            compute_logits=False,
        )
        slot = b.slot
        put = lambda big, new: big.at[:, slot, :, :length].set(
            jnp.take(new, b.source, axis=1), mode="drop"
        )
        cache = KVCache(put(cache.k, out.cache.k), put(cache.v, out.cache.v))

        prompt = jnp.take(b.prompts, b.source, axis=0)  # [S, L]
        plen = jnp.take(b.prompt_len, b.source)
        valid = idx < plen[:, None]
        rows = self.slots
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(b.base_keys), b.row_id)
        fresh = dict(
            token=jnp.take_along_axis(prompt, (plen - 1)[:, None], axis=1)[:, 0],
            pos=plen - 1,
            prompt_len=plen,
            gen=jnp.zeros((rows,), jnp.int32),
            limit=b.limit,
            running=jnp.ones((rows,), bool),
            finish=jnp.full((rows,), RUNNING, jnp.int32),
            tokens=jnp.full((rows, self.max_len), c.pad_id, jnp.int32),
            logprobs=jnp.zeros((rows, self.max_len), jnp.float32),
            recent=jnp.full((rows, self.stop_len), -1, jnp.int32),
            stops=b.stops,
            temperature=b.temperature,
            top_p=b.top_p,
            top_k=b.top_k,
            penalty=b.penalty,
            keys=jax.random.key_data(keys),
            steps=st.init_step_state(
                prompt, valid, self.step_capacity, c.think_start_id, c.think_end_id
            ),
            seen=mark_seen(jnp.zeros((rows, cfg.vocab_size), bool), prompt, valid),
            group=b.group,
            member=b.member,
        )
        set_rows = lambda old, new: old.at[slot].set(new, mode="drop")
        updated = {k: jax.tree.map(set_rows, getattr(s, k), v) for k, v in fresh.items()}
        s = dataclasses.replace(s, **updated)
        if s.table is not None:
            # A new group starts with no judged samples.
            fresh_group = jnp.zeros((rows,), bool).at[b.group].set(slot < rows, mode="drop")
            t = s.table
            s = dataclasses.replace(
                s, table=dataclasses.replace(t, active=t.active & ~fresh_group[:, None])
            )
        cache = KVCache(sh.constrain(cache.k, CACHE_AXES), sh.constrain(cache.v, CACHE_AXES))
        return cache, self._constrain(s)

    def _is_step(self) -> jax.Array:
        return (
            jnp.zeros((self.cfg.vocab_size,), bool).at[jnp.asarray(self.config.step_ids)].set(True)
        )

    def _advance(self, model, s: SlotState, logits, hidden) -> SlotState:
        """Samples each running slot's token `gen` from logits f32[S, vocab] of the forward of
        `s.token` (penultimate state hidden [S, embed]) and updates the slot's records."""
        c = self.config
        live = s.running
        rows = jnp.arange(self.slots)
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(s.keys), s.gen)
        penalised = apply_repetition_penalty(logits, s.seen, s.penalty)
        y = sample_rows(penalised, keys, s.temperature, s.top_k, s.top_p)
        y = jnp.where(live, y, c.pad_id)
        logp = jnp.where(live, token_logprob(logits, y, s.temperature), 0.0)
        steps = s.steps
        if c.score_steps:
            cand = live & st.is_candidate(s.token, y, self._is_step(), c.think_start_id)
            step_logit = jax.lax.cond(
                jnp.any(cand),
                lambda h: model.step_logits(h),
                lambda h: jnp.zeros(h.shape[:1], jnp.float32),
                hidden,
            )
            steps = st.record(steps, cand, step_logit, s.pos)
            steps = st.observe_tags(steps, y, s.pos + 1, live, c.think_start_id, c.think_end_id)
        recent = jnp.where(
            live[:, None], jnp.concatenate([s.recent[:, 1:], y[:, None]], 1), s.recent
        )
        match = (s.stops == recent[:, None, :]) | (s.stops == ANY_TOKEN)
        stop = jnp.any(jnp.all(match, axis=2) & jnp.any(s.stops != ANY_TOKEN, axis=2), axis=1)
        eos = jnp.zeros_like(live)
        if c.eos_ids:
            eos = live & jnp.isin(y, jnp.asarray(c.eos_ids, jnp.int32))
        stop = live & stop & ~eos
        last = live & ~eos & ~stop & (s.gen + 1 >= s.limit)
        finish = jnp.where(eos, EOS, jnp.where(stop, STOP, jnp.where(last, LENGTH, s.finish)))
        col = jnp.where(live, s.gen, self.max_len)  # finished slots write nothing
        s = dataclasses.replace(
            s,
            token=jnp.where(live, y, s.token),
            pos=s.pos + live,
            gen=s.gen + live,
            running=live & ~eos & ~stop & ~last,
            finish=finish.astype(jnp.int32),
            tokens=s.tokens.at[rows, col].set(y, mode="drop"),
            logprobs=s.logprobs.at[rows, col].set(logp, mode="drop"),
            recent=recent,
            steps=steps,
            seen=mark_seen(s.seen, y[:, None], live[:, None]),
        )
        if c.prune is not None:
            s = self._prune(s, live)
        return s

    def _prune(self, s: SlotState, live: jax.Array) -> SlotState:
        """Records the running scores of the slots that decoded this step in the group table;
        where a group reaches a multiple of `prune.every` tokens, applies the rule to it."""
        rule, t = self.config.prune, s.table
        scores, num = st.running_scores(s.steps)
        g = jnp.where(live, s.group, self.slots)  # other slots write nothing
        put = lambda a, v: a.at[g, s.member].set(v, mode="drop")
        t = PruneTable(
            put(t.score, scores), put(t.num, num), put(t.running, s.running), put(t.active, True)
        )
        check = s.running & (s.gen % rule.every == 0)

        def decide(t: PruneTable) -> jax.Array:
            m = self.slots
            drop = prune_decision(
                rule,
                t.score.reshape(-1),
                t.num.reshape(-1),
                t.running.reshape(-1),
                t.active.reshape(-1),
                m,
            ).reshape(m, m)
            return check & drop[s.group, s.member]

        drop = jax.lax.cond(jnp.any(check), decide, lambda t: jnp.zeros_like(check), t)
        t = dataclasses.replace(
            t,
            running=put(t.running, s.running & ~drop),
            active=t.active.at[jnp.where(drop, s.group, self.slots), s.member].set(
                False, mode="drop"
            ),
        )
        return dataclasses.replace(
            s,
            running=s.running & ~drop,
            finish=jnp.where(drop, PRUNED, s.finish).astype(jnp.int32),
            table=t,
        )

    def run_chunk(self, params, cache: KVCache, s: SlotState, window: int, steps: int):
        """Up to `steps` decode steps (fewer once no slot runs) attending over cache slots
        [0, window), which must cover every running slot's text. Returns (cache, state)."""
        model = nnx.merge(self.graphdef, params)
        win = KVCache(cache.k[:, :, :, :window], cache.v[:, :, :, :window])

        def body(carry):
            s, win, i = carry
            out = model(
                s.token[:, None],
                s.pos[:, None],
                cache=win,
                cache_index=jnp.where(s.running, s.pos, window),
            )
            s = self._advance(model, s, out.logits[:, 0], out.penultimate[:, 0])
            win = KVCache(
                sh.constrain(out.cache.k, CACHE_AXES), sh.constrain(out.cache.v, CACHE_AXES)
            )
            return self._constrain(s), win, i + 1

        def cond(carry):
            s, _, i = carry
            return (i < steps) & jnp.any(s.running)

        s, win, _ = jax.lax.while_loop(cond, body, (s, win, jnp.asarray(0, jnp.int32)))
        cache = KVCache(
            jax.lax.dynamic_update_slice(cache.k, win.k, (0, 0, 0, 0, 0)),
            jax.lax.dynamic_update_slice(cache.v, win.v, (0, 0, 0, 0, 0)),
        )
        return cache, s

    def collect(self, s: SlotState) -> dict[str, jax.Array]:
        """Every slot's outputs as `SampleResult` fields (tokens/logprobs [S, T], step arrays
        [S, step capacity]); the host keeps the rows that just finished."""
        scores, step_scores, positions, num = st.final_steps(s.steps, s.prompt_len + s.gen)
        return dict(
            tokens=s.tokens,
            logprobs=s.logprobs,
            lengths=s.gen,
            finish=s.finish,
            prompt_lengths=s.prompt_len,
            scores=scores,
            step_scores=step_scores,
            step_positions=positions,
            num_steps=num,
        )


init = jax.jit(SlotProgram.init, static_argnums=0)
admit = jax.jit(SlotProgram.admit, static_argnums=0, donate_argnums=(2, 3))
run_chunk = jax.jit(SlotProgram.run_chunk, static_argnums=(0, 4, 5), donate_argnums=(2, 3))
collect = jax.jit(SlotProgram.collect, static_argnums=0)
