"""msjax.flops: matmul FLOPs with loop trip counts, against hand counts and XLA's cost analysis."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from msjax import sharding as sh
from msjax.flops import traced_flops
from msjax.models import ModelConfig, abstract_model

S = jax.ShapeDtypeStruct
M, K, N = 8, 32, 16
MATMUL = 2 * M * K * N  # one [M, K] @ [K, N]


def test_loop_free_program_equals_xla_cost_analysis():
    def f(x, w1, w2, a, b):
        return (x @ w1) @ w2, jnp.einsum("bij,bjk->bik", a, b)

    args = (
        S((M, K), jnp.float32),
        S((K, N), jnp.float32),
        S((N, 4), jnp.float32),
        S((3, 5, 6), jnp.float32),
        S((3, 6, 7), jnp.float32),
    )
    expected = MATMUL + 2 * M * N * 4 + 2 * 3 * 5 * 6 * 7
    assert traced_flops(f, *args) == expected
    compiled = jax.jit(f).lower(*args).compile()
    assert compiled.cost_analysis()["flops"] == expected


def test_scan_counts_its_body_length_times_where_xla_counts_it_once():
    def f(x, ws):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    args = (S((M, K), jnp.float32), S((7, K, K), jnp.float32))
    assert traced_flops(f, *args) == 7 * 2 * M * K * K
    xla = jax.jit(f).lower(*args).compile().cost_analysis()["flops"]
    assert xla == pytest.approx(2 * M * K * K, rel=1e-3)  # one body: why msjax.flops exists


def test_nested_scans_multiply():
    def f(x, w):
        inner = lambda h, _: (jnp.tanh(h @ w), None)
        outer = lambda h, _: (jax.lax.scan(inner, h, None, length=3)[0], None)
        return jax.lax.scan(outer, x, None, length=5)[0]

    assert traced_flops(f, S((M, K), jnp.float32), S((K, K), jnp.float32)) == 15 * 2 * M * K * K


def test_while_loop_needs_and_uses_a_trip_count():
    def f(x, w):
        return jax.lax.while_loop(lambda c: c[0] < 10, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

    args = (S((M, K), jnp.float32), S((K, K), jnp.float32))
    with pytest.raises(ValueError, match="pass while_trips"):
        traced_flops(f, *args)
    assert traced_flops(f, *args, while_trips=9) == 9 * 2 * M * K * K


def test_nested_while_loops_are_refused():
    def f(x):
        inner = lambda y: jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1]), (0, y))
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, inner(c[1])[1]), (0, x))

    with pytest.raises(ValueError, match="nested"):
        traced_flops(f, S((2,), jnp.float32), while_trips=3)


def test_cond_counts_the_costliest_branch():
    def f(p, x, w):
        return jax.lax.cond(p, lambda x: (x @ w) @ w.T @ w, lambda x: x @ w, x)

    args = (S((), bool), S((M, K), jnp.float32), S((K, K), jnp.float32))
    assert traced_flops(f, *args) == 3 * 2 * M * K * K


def test_shard_map_counts_its_block_on_every_device_of_its_manual_axes():
    """Rows of x split over data x fsdp (4 devices) inside a shard_map manual over both (tensor
    left automatic): each device multiplies its [M / 4, K] block, 4 x those FLOPs in all."""
    mesh = sh.make_mesh((2, 2, 2))
    rows = jax.P(("data", "fsdp"))
    f = jax.shard_map(
        lambda x, w: x @ w,
        mesh=mesh,
        in_specs=(rows, jax.P()),
        out_specs=rows,
        axis_names={"data", "fsdp"},
    )
    with jax.set_mesh(mesh):
        assert traced_flops(f, S((M, K), jnp.float32), S((K, N), jnp.float32)) == MATMUL


def test_remat_backward_counts_the_recomputation():
    """Forward 1 matmul, backward 2, plus 1 recomputed forward under jax.checkpoint."""

    def loss(w, x, remat):
        body = lambda h, w: (jnp.tanh(h @ w), None)
        body = jax.checkpoint(body) if remat else body
        return jnp.sum(jax.lax.scan(body, x, w)[0])

    args = (S((4, K, K), jnp.float32), S((M, K), jnp.float32))
    one = 2 * M * K * K
    plain = traced_flops(jax.grad(lambda w, x: loss(w, x, False)), *args)
    remat = traced_flops(jax.grad(lambda w, x: loss(w, x, True)), *args)
    assert (plain, remat) == (4 * 3 * one, 4 * 4 * one)


def test_model_forward_matches_the_analytic_count():
    """The reflective model's forward (scan over layers, chunked attention) against the
    textbook count: projections + attention over every [query, key] pair + LM head."""
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        attention="chunked",
        attention_chunk=8,
    )
    graphdef, state = abstract_model(cfg)
    b, t = 2, 24

    def forward(state, tokens):
        model = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        return model(tokens, positions).logits

    got = traced_flops(forward, state, S((b, t), jnp.int32))
    c, d, h, kv, m = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, 48
    per_token_layer = 2 * (c * d * (h + 2 * kv) + h * d * c + 3 * c * m) + 2 * 2 * t * h * d
    expected = b * t * (cfg.num_layers * per_token_layer + 2 * c * cfg.vocab_size)
    assert got == expected
