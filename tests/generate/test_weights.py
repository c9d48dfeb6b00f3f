"""msjax.generate.weights.DecodeWeights: the decode layout and dtype, one compiled transfer that
reuses the previous copy's buffers, and the sampler on the copy."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_sampler import full_forward

from msjax.generate import Sampler, SamplerConfig
from msjax.generate.weights import DecodeWeights, decode_dtype
from msjax.models import abstract_model
from msjax.sharding import make_mesh, state_shardings


@pytest.fixture(scope="module")
def setup(small_model):
    """(model, cfg, mesh 2x2x2, training params: a pure dict in the training (FSDP) layout)."""
    model, cfg = small_model
    mesh = make_mesh((2, 2, 2))
    state = nnx.state(model)
    train = nnx.to_pure_dict(jax.device_put(state, state_shardings(state, mesh)))
    return model, cfg, mesh, train


def leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def test_layout_is_tensor_parallel_and_the_backbone_bf16(setup):
    _, cfg, mesh, train = setup
    weights = DecodeWeights(abstract_model(cfg, mesh)[1], mesh, "bfloat16")
    copy = weights.refresh(train)
    bb = copy["backbone"]
    expected = {
        "embed": P("tensor", None),
        "q_kernel": P(None, None, "tensor", None),  # [layers, embed, heads, head_dim]
        "o_kernel": P(None, "tensor", None, None),  # [layers, heads, head_dim, embed]
        "down_kernel": P(None, "tensor", None),  # [layers, mlp, embed]
        "scale": P(None, None),
    }
    assert bb["embed"].sharding.spec == expected["embed"]
    assert bb["layers"]["attn"]["q_kernel"].sharding.spec == expected["q_kernel"]
    assert bb["layers"]["attn"]["o_kernel"].sharding.spec == expected["o_kernel"]
    assert bb["layers"]["mlp"]["down_kernel"].sharding.spec == expected["down_kernel"]
    assert bb["layers"]["input_norm"]["scale"].sharding.spec == expected["scale"]
    assert copy["head"]["w1"].sharding.spec == P(None, "tensor")
    for (path, x), (_, ref) in zip(leaves(copy), leaves(train), strict=True):
        assert "fsdp" not in str(x.sharding.spec) and "data" not in str(x.sharding.spec), path
        kept = path[0].key == "head" or path[-1].key == "scale"  # SPRM head, norm scales
        assert x.dtype == (jnp.float32 if kept else jnp.bfloat16), path
        want = np.asarray(ref) if kept else np.asarray(ref).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(x), want)
    # The abstract copy (what msjax-aot compiles against) is the real one's shape, dtype, layout.
    for a, x in zip(jax.tree.leaves(weights.abstract), jax.tree.leaves(copy), strict=True):
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)


def test_refresh_reuses_the_previous_buffers_in_one_program(setup):
    _, cfg, mesh, train = setup
    weights = DecodeWeights(abstract_model(cfg, mesh)[1], mesh)
    assert weights.dtype == jnp.float32  # CPU: the training dtype
    first = weights.refresh(train)
    same_layout = jax.tree.map(lambda x: x.sharding, train)  # as the train step returns them
    doubled = jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t), out_shardings=same_layout)(train)
    second = weights.refresh(doubled)
    assert all(x.is_deleted() for x in jax.tree.leaves(first))  # donated to the new copy
    assert not any(x.is_deleted() for x in jax.tree.leaves((train, doubled)))
    for x, ref in zip(jax.tree.leaves(second), jax.tree.leaves(doubled), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
    for _ in range(2):
        third = weights.refresh(train)
    for x, ref in zip(jax.tree.leaves(third), jax.tree.leaves(train), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
    assert weights._again._cache_size() == 1  # one compiled transfer, whatever the step


def test_bf16_copy_computes_what_a_bf16_compute_model_computes(small_model):
    """With bf16 compute and f32 parameters (the shipped recipes), the model casts matrices and
    biases to bf16 itself: its forward on the bf16 copy is bit for bit its forward on the f32
    training parameters (logits and SPRM step logits)."""
    model, cfg = small_model
    graphdef, abstract = abstract_model(cfg.replace(dtype="bfloat16"))
    params = nnx.to_pure_dict(nnx.state(model))
    copy = DecodeWeights(abstract, None, "bfloat16").refresh(params)

    @jax.jit
    def forward(params, tokens):
        m = nnx.merge(graphdef, params)
        out = m(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
        return out.logits, m.step_logits(out.penultimate)

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 9)), jnp.int32)
    for got, want in zip(forward(copy, tokens), forward(params, tokens), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decode_dtype_defaults_and_errors():
    assert decode_dtype("", jnp.float32, "tpu") == jnp.bfloat16
    assert decode_dtype("", jnp.float32, "gpu") == jnp.bfloat16
    assert decode_dtype("", jnp.float32, "cpu") == jnp.float32
    assert decode_dtype("float32", jnp.bfloat16, "tpu") == jnp.float32
    with pytest.raises(ValueError, match="config.rollout.decode_dtype='fp8'; choose one of"):
        decode_dtype("fp8", jnp.float32, "tpu")


def test_greedy_sampling_on_the_copy_equals_a_full_forward(setup, special):
    """The sampler on the decode copy (2x2x2 mesh): each greedy token is the argmax of a plain
    one-device forward of the training model over the text so far, with its log-prob."""
    model, cfg, mesh, train = setup
    config = SamplerConfig(
        max_new_tokens=10, temperature=0.0, pad_id=special.pad, step_ids=special.delims,
        think_start_id=special.think, think_end_id=special.end_think, prompt_buckets=(8,),
    )  # fmt: skip
    prompts = [[special.think, 7, 8, 9], [2, special.think, 10]]
    copy = DecodeWeights(abstract_model(cfg, mesh)[1], mesh).refresh(train)
    out = Sampler(model, cfg, config, mesh=mesh)(copy, prompts, key=jax.random.key(0)).to_host()
    texts = [p + out.response(r) for r, p in enumerate(prompts)]
    logits, _, _, _ = full_forward(model, texts)
    for r, p in enumerate(prompts):
        pred = logits[r, len(p) - 1 : len(texts[r]) - 1]
        np.testing.assert_array_equal(out.response(r), pred.argmax(-1))
        logp = jax.nn.log_softmax(pred)[np.arange(len(pred)), pred.argmax(-1)]
        np.testing.assert_allclose(out.logprobs[r, : len(pred)], logp, atol=1e-5)
