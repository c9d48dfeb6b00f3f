"""Streaming SPRM step scores: REFERENCE section 2's rules evaluated one generated token at a time.

While decoding, the sampler forwards token x_t and gets its penultimate hidden state h_t and the
logits from which x_{t+1} is drawn. If x_{t+1} is a step delimiter, x_t is not a delimiter (first
of a run) and x_t is not `<think>`, then (t, head(h_t)) is recorded as a CANDIDATE step, with t the
position of x_t in the prompt+response text. Only delimiters the model GENERATES make candidates
(the step must end inside the response); the prompt still matters through x_t (the last prompt
token for the first generated one) and through the `<think>`/`</think>` counts.

Whether a candidate counts depends on the whole text (the inference rule's "exactly one
`<think>`/`</think>`"), so it is resolved from the tag counts and first-tag positions:
    lo = position of `<think>` if the text has exactly one, else 0
    hi = position of `</think>` if the text has exactly one, else the text length
    counted = lo < t < hi
At the end this is exactly `msjax.models.sprm.step_mask(prompt + response,
scorable=delimiter in the response)`. The RUNNING score used for pruning is the same rule applied
to the text generated so far, as if it ended now (an unmatched `</think>` count of 0 leaves hi
open); it equals the final score whenever the rest of the response adds no think tag.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from msjax.models.sprm import trajectory_score

_OPEN = jnp.iinfo(jnp.int32).max


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepState:
    """Per-row step bookkeeping (rows, S = step capacity).

    logits: f32[rows, S] candidate step logits; positions: int32[rows, S] text position of the
    scored token (-1 = empty slot); count: int32[rows] candidates so far; n_start / n_end:
    int32[rows] `<think>` / `</think>` counts (prompt included); start_pos / end_pos: int32[rows]
    position of the first of each (-1 = none).
    """

    logits: jax.Array
    positions: jax.Array
    count: jax.Array
    n_start: jax.Array
    start_pos: jax.Array
    n_end: jax.Array
    end_pos: jax.Array


def _first_tag(tokens, valid, positions, tag_id):
    if tag_id is None:
        zeros = jnp.zeros(tokens.shape[:1], jnp.int32)
        return zeros, zeros - 1
    hits = (tokens == tag_id) & valid
    first = jnp.take_along_axis(positions, jnp.argmax(hits, axis=1)[:, None], axis=1)[:, 0]
    n = hits.sum(axis=1).astype(jnp.int32)
    return n, jnp.where(n > 0, first, -1).astype(jnp.int32)


def init_step_state(
    prompt: jax.Array,
    prompt_valid: jax.Array,
    capacity: int,
    think_start_id: int | None,
    think_end_id: int | None,
) -> StepState:
    """Empty candidate slots plus the think-tag counts of the prompt.

    prompt: int32[rows, L] (any padding); prompt_valid: bool[rows, L]; capacity: S.
    """
    rows = prompt.shape[0]
    positions = jnp.cumsum(prompt_valid, axis=1) - 1
    n_start, start_pos = _first_tag(prompt, prompt_valid, positions, think_start_id)
    n_end, end_pos = _first_tag(prompt, prompt_valid, positions, think_end_id)
    return StepState(
        logits=jnp.zeros((rows, capacity), jnp.float32),
        positions=jnp.full((rows, capacity), -1, jnp.int32),
        count=jnp.zeros((rows,), jnp.int32),
        n_start=n_start,
        start_pos=start_pos,
        n_end=n_end,
        end_pos=end_pos,
    )


def is_candidate(
    prev: jax.Array, token: jax.Array, is_step: jax.Array, think_start_id: int | None
) -> jax.Array:
    """bool[rows]: `token` is the first delimiter of a run and `prev` is not `<think>`.

    prev, token: int32[rows]; is_step: bool[vocab] delimiter lookup table.
    """
    cand = is_step[token] & ~is_step[prev]
    if think_start_id is not None:
        cand &= prev != think_start_id
    return cand


def observe_tags(
    state: StepState,
    token: jax.Array,
    position: jax.Array,
    live: jax.Array,
    think_start_id: int | None,
    think_end_id: int | None,
) -> StepState:
    """Counts a new token's think tags. token, position: int32[rows]; live: bool[rows]."""

    def update(n, pos, tag_id):
        if tag_id is None:
            return n, pos
        hit = live & (token == tag_id)
        return n + hit, jnp.where(hit & (n == 0), position, pos)

    n_start, start_pos = update(state.n_start, state.start_pos, think_start_id)
    n_end, end_pos = update(state.n_end, state.end_pos, think_end_id)
    return dataclasses.replace(
        state, n_start=n_start, start_pos=start_pos, n_end=n_end, end_pos=end_pos
    )


def record(state: StepState, cand: jax.Array, logit: jax.Array, position: jax.Array) -> StepState:
    """Stores (logit, position) in the next free slot of the rows where `cand` (bool[rows])."""
    rows, cap = state.logits.shape
    r = jnp.arange(rows)
    slot = jnp.minimum(state.count, cap - 1)
    logits = state.logits.at[r, slot].set(jnp.where(cand, logit, state.logits[r, slot]))
    positions = state.positions.at[r, slot].set(jnp.where(cand, position, state.positions[r, slot]))
    return dataclasses.replace(state, logits=logits, positions=positions, count=state.count + cand)


def resolve_mask(state: StepState, text_len: jax.Array | None = None) -> jax.Array:
    """bool[rows, S]: the candidates that count under the inference rule.

    text_len: int32[rows] final text lengths, or None for the running rule (text so far).
    """
    lo = jnp.where(state.n_start == 1, state.start_pos, 0)
    end = _OPEN if text_len is None else text_len
    hi = jnp.where(state.n_end == 1, state.end_pos, end)
    slots = jnp.arange(state.logits.shape[1])[None, :]
    pos = state.positions
    return (slots < state.count[:, None]) & (pos > lo[:, None]) & (pos < hi[:, None])


def running_scores(state: StepState) -> tuple[jax.Array, jax.Array]:
    """(f32[rows] trajectory score of the text so far, int32[rows] its step count)."""
    mask = resolve_mask(state)
    return trajectory_score(state.logits, mask), mask.sum(axis=1).astype(jnp.int32)


def final_steps(state: StepState, text_len: jax.Array):
    """Resolves the steps of finished texts.

    Returns (scores f32[rows] trajectory scores, step_scores f32[rows, S] sigmoid step scores
    packed to the left (0 after), step_positions int32[rows, S] (-1 after), num_steps int32[rows]).
    """
    mask = resolve_mask(state, text_len)
    scores = trajectory_score(state.logits, mask)
    order = jnp.argsort(~mask, axis=1, stable=True)
    packed = jnp.take_along_axis(mask, order, axis=1)
    step_scores = jnp.where(
        packed, jax.nn.sigmoid(jnp.take_along_axis(state.logits, order, axis=1)), 0.0
    )
    positions = jnp.where(packed, jnp.take_along_axis(state.positions, order, axis=1), -1)
    return scores, step_scores, positions, mask.sum(axis=1).astype(jnp.int32)
