"""ReflectiveModel mechanics: cache vs full forward, remat, chunked attention, sharding, errors.

Numerical parity against transformers lives in test_parity.py; these tests compare msjax's own
execution paths with each other and with one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msjax import sharding as sh
from msjax.models import KVCache, ModelConfig, abstract_model, create_model

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2
)


def _batch(b=2, t=12, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t))
    valid = np.ones((b, t), bool)
    valid[1, :4] = False  # left padding
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(valid)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_cached_prefill_and_decode_equal_full_forward(num_layers):
    cfg = CFG.replace(num_layers=num_layers)
    model = create_model(cfg, seed=1)
    tokens, pos, valid = _batch()
    full = model(tokens, pos, valid)
    kv = jnp.zeros((2, 16), bool).at[:, :12].set(valid)
    out = model(tokens[:, :9], pos[:, :9], kv, cache=KVCache.zeros(cfg, 2, 16), cache_index=0)
    logits, pen = [out.logits], [out.penultimate]
    cache = out.cache
    for i in range(9, 12):
        step = model(tokens[:, i : i + 1], pos[:, i : i + 1], kv, cache=cache, cache_index=i)
        cache = step.cache
        logits.append(step.logits)
        pen.append(step.penultimate)
    v = np.asarray(valid)
    np.testing.assert_allclose(np.concatenate(logits, 1)[v], np.asarray(full.logits)[v], atol=1e-5)
    np.testing.assert_allclose(
        np.concatenate(pen, 1)[v], np.asarray(full.penultimate)[v], atol=1e-5
    )


def _loss_and_grads(cfg, tokens, pos, valid):
    model = create_model(cfg, seed=2)
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(tokens, pos, valid)
        head = nnx.merge(graphdef, state).step_logits(out.penultimate)
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]) + jnp.mean(head)

    return jax.value_and_grad(loss)(state)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(remat):
    batch = _batch()
    l0, g0 = _loss_and_grads(CFG, *batch)
    l1, g1 = _loss_and_grads(CFG.replace(remat=remat), *batch)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        # Recomputation reorders f32 sums: ~1e-7 absolute noise on gradients of order 1e-3.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_chunked_attention_equals_dense_including_gradients():
    batch = _batch(t=13)  # not a multiple of the chunk
    l0, g0 = _loss_and_grads(CFG, *batch)
    l1, g1 = _loss_and_grads(CFG.replace(attention="chunked", attention_chunk=4), *batch)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_causal_attention_blocks_equal_one_block_including_gradients():
    """Skipping the keys after each query block changes nothing: values, gradients, and the
    padding queries that see no key at all (output 0 in every block layout)."""
    batch = _batch(t=13)  # not a multiple of the blocks; row 1 starts with 4 padding slots
    l0, g0 = _loss_and_grads(CFG.replace(attention_block=13), *batch)  # one block
    l1, g1 = _loss_and_grads(CFG.replace(attention_block=3), *batch)  # 5 uneven blocks
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bf16_compute_stays_close_to_fp32():
    tokens, pos, valid = _batch()
    f32 = create_model(CFG, seed=3)(tokens, pos, valid).logits
    bf = create_model(CFG.replace(dtype="bfloat16", param_dtype="bfloat16"), seed=3)
    out = bf(tokens, pos, valid).logits
    assert out.dtype == jnp.float32  # logits always in fp32
    v = np.asarray(valid)
    assert np.abs(np.asarray(out) - np.asarray(f32))[v].max() < 0.05


def test_sharded_init_and_forward_equal_one_device():
    mesh = sh.make_mesh((2, 2, 2))
    cfg = CFG.replace(num_heads=4, num_kv_heads=2)
    single = create_model(cfg, seed=5)
    sharded = create_model(cfg, mesh, seed=5)
    for a, b in zip(
        jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(sharded)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = nnx.state(sharded)["backbone"]["layers"]["attn"]["q_kernel"].value
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 8)

    tokens, pos, valid = _batch(b=4)
    graphdef, state = nnx.split(sharded)

    @jax.jit
    def fwd(state, tokens, pos, valid):
        out = nnx.merge(graphdef, state)(tokens, pos, valid)
        return out.logits, nnx.merge(graphdef, state).step_logits(out.penultimate)

    with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(x, sh.batch_sharding(mesh))
        logits, steps = fwd(state, put(tokens), put(pos), put(valid))
    ref = single(tokens, pos, valid)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref.logits), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(steps), np.asarray(single.step_logits(ref.penultimate)), atol=1e-5
    )


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="needs 12 devices but 8"):
        sh.make_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="at most one -1"):
        sh.make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="Unknown mesh axis"):
        sh.make_mesh({"model": 8})
    assert sh.make_mesh({"data": 2, "fsdp": -1}).shape == {"data": 2, "fsdp": 4, "tensor": 1}
    # kv_heads=2 cannot be split over tensor=4: named error before any compile
    mesh = sh.make_mesh((1, 2, 4))
    with pytest.raises(ValueError, match="kv_kernel|k_kernel|v_kernel|k_bias|v_bias"):
        abstract_model(CFG.replace(num_heads=8, hidden_size=32), mesh)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_heads=3), "hidden_size=32 is not divisible"),
        (dict(num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(dtype="float16"), "ModelConfig.dtype"),
        (dict(remat="some"), "ModelConfig.remat"),
        (dict(attention="flash"), "ModelConfig.attention"),
        (dict(vocab_size=0), "vocab_size must be a positive int"),
        (dict(head_dropout=1.0), "head_dropout"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**change)


def test_config_round_trip_and_param_count():
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="Unknown ModelConfig field"):
        ModelConfig.from_dict({**CFG.to_dict(), "sliding_window": 4})
    for tied in (False, True):
        cfg = CFG.replace(tie_word_embeddings=tied)
        n = sum(np.size(x) for x in jax.tree.leaves(nnx.state(create_model(cfg))))
        assert n == cfg.num_params()
