"""The incremental step rules against `step_mask` + `trajectory_score` on whole texts: random texts
over a tiny vocabulary full of delimiters and think tags, random step logits."""

import jax
import jax.numpy as jnp
import numpy as np

from msjax.generate import steps as st
from msjax.models import step_mask, trajectory_score

DELIMS, THINK, END = (3, 4), 5, 6
VOCAB, ROWS, PROMPT, RESPONSE = 8, 400, 6, 14


@jax.jit
def stream(prompt, valid, response, table):
    """Runs the streaming rules over `response` (int[rows, T]); table: f32[rows, positions]
    step logit of the token at each text position.

    Returns the final state and the running (score, count) after each token.
    """
    rows = jnp.arange(table.shape[0])
    is_step = jnp.zeros((VOCAB,), bool).at[jnp.asarray(DELIMS)].set(True)
    state = st.init_step_state(prompt, valid, (RESPONSE + 1) // 2, THINK, END)
    plen = valid.sum(axis=1)

    def one(carry, t):
        state, prev = carry
        y = response[:, t]
        cand = st.is_candidate(prev, y, is_step, THINK)
        pos = plen + t - 1
        state = st.record(state, cand, table[rows, pos], pos)
        state = st.observe_tags(state, y, pos + 1, jnp.ones_like(cand), THINK, END)
        return (state, y), st.running_scores(state)

    steps = jnp.arange(response.shape[1])
    (state, _), running = jax.lax.scan(one, (state, prompt[:, -1]), steps)
    return state, running


@jax.jit
def reference(texts, valid, plen, step_logits):
    scorable = jnp.arange(texts.shape[1])[None, :] >= plen[:, None] - 1
    mask = step_mask(texts, valid, DELIMS, THINK, END, scorable=scorable)
    return mask, trajectory_score(step_logits, mask)


def test_streaming_rules_equal_full_text_rules():
    rng = np.random.default_rng(0)
    # Tokens 3-6 are 4/8 of the vocabulary: runs, tags after tags, several tags per text.
    plen = rng.integers(1, PROMPT + 1, size=ROWS)
    prompt = rng.integers(0, VOCAB, size=(ROWS, PROMPT)).astype(np.int32)
    valid = np.arange(PROMPT)[None, :] >= PROMPT - plen[:, None]  # left-padded
    prompt = np.where(valid, prompt, 0)
    response = rng.integers(0, VOCAB, size=(ROWS, RESPONSE)).astype(np.int32)
    # step logit of the token at text position p of each row
    logit_table = rng.normal(0, 2, size=(ROWS, PROMPT + RESPONSE)).astype(np.float32)
    state, running = jax.device_get(stream(prompt, valid, response, logit_table))

    # Whole texts, right-padded, positions = text index.
    width = PROMPT + RESPONSE
    texts = np.zeros((ROWS, width), np.int32)
    tvalid = np.zeros((ROWS, width), bool)
    for r in range(ROWS):
        row = list(prompt[r, valid[r]]) + list(response[r])
        texts[r, : len(row)], tvalid[r, : len(row)] = row, True
    mask, ref = jax.device_get(reference(texts, tvalid, plen, logit_table))
    final = st.final_steps(state, jnp.asarray(plen + RESPONSE))
    scores, step_scores, positions, num = jax.device_get(final)
    np.testing.assert_allclose(scores, ref, atol=1e-6)
    np.testing.assert_array_equal(num, mask.sum(axis=1))
    for r in range(ROWS):
        pos = np.flatnonzero(mask[r])
        np.testing.assert_array_equal(positions[r, : len(pos)], pos)
        assert np.all(positions[r, len(pos) :] == -1)
        ref_steps = 1 / (1 + np.exp(-logit_table[r, pos].astype(np.float64)))
        np.testing.assert_allclose(step_scores[r, : len(pos)], ref_steps, atol=1e-6)
    # Every case the rule distinguishes occurs here.
    assert (num == 0).any() and (num >= 2).any()
    assert (state.n_start >= 2).any() and (state.n_end == 1).any()
    assert state.count.sum() > mask.sum()

    # The running score after t tokens is the full rule on the prefix text (as if it ended).
    for t in (0, 5, RESPONSE - 1):
        cut = np.where(np.arange(width)[None, :] < (plen + t + 1)[:, None], texts, 0)
        cut_valid = tvalid & (np.arange(width)[None, :] < (plen + t + 1)[:, None])
        mask_t, ref_t = jax.device_get(reference(cut, cut_valid, plen, logit_table))
        run_score, run_count = running[0][t], running[1][t]
        np.testing.assert_allclose(run_score, ref_t, atol=1e-6)
        np.testing.assert_array_equal(run_count, mask_t.sum(axis=1))


def test_hand_worked_case():
    # prompt: "a <think>" ; response: ". . b . </think> c ." (". " = delimiter 3)
    prompt = jnp.asarray([[7, THINK]], jnp.int32)
    response = jnp.asarray([[3, 3, 7, 3, END, 7, 3]], jnp.int32)
    logits = jnp.arange(10, dtype=jnp.float32)[None, :] - 4.0  # logit at position p = p - 4
    state, _ = stream(prompt, jnp.ones((1, 2), bool), response, logits)
    scores, _, positions, num = jax.device_get(st.final_steps(state, jnp.asarray([9])))
    # Candidates: pos 1 (<think> before the first "." -> not a candidate), the second "." is a
    # run, "b" at pos 4 before "." counts; "c" at pos 7 lies after </think> (pos 6).
    assert int(num[0]) == 1 and int(positions[0, 0]) == 4
    np.testing.assert_allclose(scores[0], 0.5, atol=1e-7)
    assert int(state.count[0]) == 2  # "b ." and "c ." were candidates
