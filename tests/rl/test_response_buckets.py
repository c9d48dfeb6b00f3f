"""Training on the lengths generated: a rollout batch is padded to the smallest of a few fixed
response widths that holds its longest response, with the same losses and gradients as at
max_new_tokens, and at most one compiled train step per width (two widths here: a compile of the
tiny train step costs tens of seconds on the CI machine; the choice among more widths is tested
without compiling)."""

import jax
import numpy as np
import pytest
from flax import nnx

from msjax.models import ModelConfig, create_model
from msjax.rl import rollout
from msjax.rl.optimizer import OptimizerConfig, make_optimizer
from msjax.rl.train_step import LossConfig, init_train_state, make_train_step

CFG = ModelConfig(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dropout=0.0,
)
MAX_NEW, PROMPTS, N, STEP_ID, THINK_END = 48, 2, 4, 7, 9
pytestmark = pytest.mark.expensive(minutes=1)


def rollout_batch(longest: int, width: int, seed: int = 0) -> dict:
    """A random rollout (responses of at most `longest` tokens, one of exactly that length) as
    the train batch at response `width`."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(10, CFG.vocab_size, (PROMPTS, 6)).astype(np.int32)
    prompt_len = np.array([6, 4], np.int32)
    lengths = rng.integers(1, longest + 1, PROMPTS * N).astype(np.int32)
    lengths[1] = longest
    resp = rng.integers(10, CFG.vocab_size, (PROMPTS * N, MAX_NEW)).astype(np.int32)
    resp[:, 3::4] = STEP_ID
    resp[np.arange(MAX_NEW)[None] >= lengths[:, None]] = 0  # what the sampler leaves there
    logp = rng.normal(-3.0, 0.5, resp.shape).astype(np.float32)
    rewards = (rng.random(PROMPTS * N) > 0.5).astype(np.float32)
    return rollout.train_batch(
        prompt,
        prompt_len,
        resp[:, :width],
        lengths,
        logp[:, :width],
        rewards,
        N,
        step_ids=[STEP_ID],
        think_start_id=None,
        think_end_id=None,
    )


def test_response_widths_and_choice():
    assert rollout.response_widths(48, 4) == (8, 16, 24, 48)
    assert rollout.response_widths(8192, 4) == (1024, 2048, 4096, 8192)
    assert rollout.response_widths(48, 1) == (48,)
    widths = rollout.response_widths(48, 4)
    assert [rollout.response_width(np.array([n, 1]), widths) for n in (0, 8, 9, 25, 48)] == [
        8,
        8,
        16,
        48,
        48,
    ]
    with pytest.raises(ValueError, match="exceeds the widths"):
        rollout.response_width(np.array([49]), widths)


def test_bucketed_widths_train_like_max_new_tokens_padding_with_one_compile_per_width():
    tx = make_optimizer(OptimizerConfig(lr=1e-3, head_lr=1e-2))
    graphdef, state = nnx.split(create_model(CFG, seed=0))
    params = nnx.to_pure_dict(state)
    step = make_train_step(graphdef, tx, LossConfig(logprob_chunk=8, num_microbatches=2))
    widths = rollout.response_widths(MAX_NEW, 2)
    assert widths == (24, MAX_NEW)
    fresh = lambda: init_train_state(jax.tree.map(np.array, params), tx, seed=1)

    width = rollout.response_width(np.array([20]), widths)
    assert width == 24
    s_full, m_full = step(fresh(), rollout_batch(20, MAX_NEW))
    s_cut, m_cut = step(fresh(), rollout_batch(20, width))
    for key in m_full:
        assert float(m_cut[key]) == pytest.approx(float(m_full[key]), rel=1e-5, abs=1e-7), key
    assert float(m_full["grad_norm"]) > 0 and float(m_full["head_grad_norm"]) > 0
    for a, b in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(s_cut.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)

    for seed, longest in enumerate((3, 12, 7, 40, 1)):
        w = rollout.response_width(np.array([longest]), widths)
        step(fresh(), rollout_batch(longest, w, seed))
    assert step._cache_size() == len(widths)  # 24 and 48: one program each
