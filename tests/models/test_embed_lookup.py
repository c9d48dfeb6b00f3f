"""`embed_lookup` (the training layout's embedding lookup, msjax.models.qwen2): rows and table
gradient against NumPy on meshes of the 8 fake CPU devices, and the decoder with it against the
gathered-table lookup."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from msjax import sharding as sh
from msjax.models import ModelConfig, create_model
from msjax.models.qwen2 import embed_lookup

VOCAB, EMBED, B, T = 64, 16, 8, 5
MESHES = [None, (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1)]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(VOCAB, EMBED)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    cotangent = rng.normal(size=(B, T, EMBED)).astype(np.float32)
    return table, tokens, cotangent


def _rows_and_grad(table, tokens, cotangent):
    def f(table, tokens):
        rows = embed_lookup(table, tokens, jnp.float32)
        return rows, jax.grad(lambda t: jnp.sum(embed_lookup(t, tokens, jnp.float32) * cotangent))(
            table
        )

    return jax.jit(f)


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_rows_and_table_gradient_match_numpy(shape):
    table, tokens, cotangent = _data()
    want_grad = np.zeros_like(table)
    np.add.at(want_grad, tokens, cotangent)  # the lookup's transpose: a scatter-add
    fn = _rows_and_grad(table, tokens, cotangent)
    if shape is None:
        rows, grad = fn(table, tokens)
    else:
        mesh = sh.make_mesh(shape)
        table_sh = NamedSharding(mesh, sh.logical_to_spec(("vocab", "embed")))
        args = jax.device_put(table, table_sh), jax.device_put(tokens, sh.batch_sharding(mesh))
        with jax.set_mesh(mesh):
            rows, grad = fn(*args)
        assert grad.sharding.spec == table_sh.spec  # formed in the table's own shards
    np.testing.assert_array_equal(np.asarray(rows), table[tokens])
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-6, atol=1e-6)


def test_the_table_is_never_gathered_nor_its_gradient_reduced():
    """Compiled for (data 2, fsdp 2, tensor 2): no collective on anything as large as the table
    (tokens are gathered, rows moved by an all-to-all); the one collective at the size of the
    table's shard is the sum of its gradient over data."""
    table, tokens, cotangent = _data()
    mesh = sh.make_mesh((2, 2, 2))
    table_sh = NamedSharding(mesh, sh.logical_to_spec(("vocab", "embed")))
    args = jax.device_put(table, table_sh), jax.device_put(tokens, sh.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        text = _rows_and_grad(table, tokens, cotangent).lower(*args).compile().as_text()
    shard = VOCAB * EMBED // 4  # [vocab / tensor, embed / fsdp]
    found = 0
    for result, kind in re.findall(r"= (.+?) (all-gather|all-reduce|reduce-scatter)\(", text):
        for dims in re.findall(r"\w+\[([\d,]*)\]", result):
            n = int(np.prod([int(d) for d in dims.split(",") if d]))
            assert n < shard or (n == shard and kind == "all-reduce"), (result, kind)
            found += n == shard
    assert found == 1, text  # the gradient's sum over data


def test_decoder_with_the_sharded_lookup_equals_the_gathered_table():
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
        num_kv_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    mesh = sh.make_mesh((2, 2, 2))
    graphdef, state = nnx.split(create_model(cfg, mesh=mesh, seed=3))
    _, tokens, _ = _data(1)
    tokens = jax.device_put(tokens, sh.batch_sharding(mesh))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))

    @jax.jit
    def both(state, tokens):
        backbone = nnx.merge(graphdef, state).backbone
        return [backbone(tokens, pos, sharded_lookup=s)[:2] for s in (False, True)]

    with jax.set_mesh(mesh):
        gathered, sharded = both(state, tokens)
    for a, b in zip(gathered, sharded, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
