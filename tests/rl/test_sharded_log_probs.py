"""The train step's log-prob forward on a mesh (the unembedding gathered over fsdp inside a
shard_map, msjax.rl.train_step._log_probs) equals the same on one device: log-probs, entropies
and the gradients of hidden states and unembedding, tied and untied, on a 2x2x2 mesh of the 8
fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msjax import sharding as sh
from msjax.models import ModelConfig, create_model
from msjax.rl.train_step import LossConfig, _log_probs

B, T, EMBED, VOCAB = 8, 9, 16, 48
LOSS = LossConfig(logprob_chunk=4, temperature=0.7)


def _weighted_sum(graphdef, state, hidden, targets, weights):
    """sum of w_logp * logp + w_ent * entropy, and the log-probs and entropies."""
    logp, ent = _log_probs(hidden, nnx.merge(graphdef, state).backbone, targets, LOSS)
    return jnp.sum(weights[0] * logp + weights[1] * ent), (logp, ent)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sharded_log_probs_and_gradients_equal_one_device(tied):
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=8, num_layers=1, num_heads=4,
        num_kv_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(B, T, EMBED)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(2, B, T)), jnp.float32)
    fn = jax.jit(jax.value_and_grad(_weighted_sum, argnums=(1, 2), has_aux=True), static_argnums=0)
    graphdef, state = nnx.split(create_model(cfg, seed=1))
    want = fn(graphdef, state, hidden, targets, weights)

    mesh = sh.make_mesh((2, 2, 2))
    graphdef, sharded = nnx.split(create_model(cfg, mesh=mesh, seed=1))
    rows = lambda x: jax.device_put(x, sh.batch_sharding(mesh, x.ndim))
    with jax.set_mesh(mesh):
        got = fn(graphdef, sharded, rows(hidden), rows(targets), weights)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    # the gradient of the unembedding is nonzero and comes back in the parameter's sharding
    name = "embed" if tied else "lm_head"
    grad = got[1][0]["backbone"][name].value
    assert float(jnp.abs(grad).max()) > 0
    assert grad.sharding.spec == sharded["backbone"][name].value.sharding.spec
