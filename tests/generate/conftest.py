"""Tiny models for the sampler tests: random msjax models, a random transformers Qwen2 with its
weights copied into msjax, and a "Markov" model whose next-token logits and SPRM step logits are
set by hand (they depend only on the current token)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msjax.models import ModelConfig, abstract_model

# A small vocabulary where delimiters and think tags are frequent under a random model.
SPECIAL = types.SimpleNamespace(pad=0, eos=1, delims=(3, 4), think=5, end_think=6)
SMALL_VOCAB = 12


def build_model(cfg: ModelConfig, fill, seed: int = 0, scale: float | None = None):
    """A ReflectiveModel whose parameters are NumPy arrays: random normals (std `scale`, default
    the config's initializer_range; norm scales 1), then `fill(pure dict)` may overwrite any.

    Faster than `create_model` in tests: nothing is compiled to initialise.
    """
    graphdef, abstract = abstract_model(cfg)
    rng = np.random.default_rng(seed)
    std = cfg.initializer_range if scale is None else scale

    def init(path, x):
        if "scale" in path:
            return np.ones(x.shape, np.float32)
        return (std * rng.standard_normal(x.shape)).astype(np.float32)

    shapes = nnx.to_pure_dict(abstract)
    pure = fill(_map_with_path(init, shapes, ()))
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, abstract)


def _map_with_path(fn, tree, path):
    if isinstance(tree, dict):
        return {k: _map_with_path(fn, v, path + (k,)) for k, v in tree.items()}
    return fn(path, tree)


@pytest.fixture(scope="session")
def special():
    """Token ids of the small vocabulary: pad, eos, delims, think, end_think."""
    return SPECIAL


@pytest.fixture(scope="session")
def small_model():
    """A random model over SMALL_VOCAB with a wide init (peaked, varied distributions)."""
    cfg = ModelConfig(
        vocab_size=SMALL_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
    )
    return build_model(cfg, lambda p: p, seed=1), cfg


def markov_model(transition_logits: np.ndarray, step_logits: np.ndarray):
    """A model whose next-token logits after token v are transition_logits[v] and whose SPRM
    logit on the hidden state of token v is step_logits[v] (every layer outputs 0, so the
    hidden state of a token is its one-hot embedding)."""
    vocab = transition_logits.shape[0]
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=vocab,
        intermediate_size=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=512,
    )

    def fill(p):
        bb = p["backbone"]
        for layer in (bb["layers"], bb["last_layer"]):
            for part in ("attn", "mlp"):
                for k in layer[part]:
                    layer[part][k] = np.zeros_like(layer[part][k])
        bb["embed"] = np.eye(vocab, dtype=np.float32)
        # final norm of a one-hot row e_v is sqrt(C) e_v.
        bb["lm_head"] = (transition_logits / np.sqrt(vocab)).astype(np.float32)
        head = p["head"]
        offset = float(step_logits.min()) - 1.0
        head["w1"] = np.zeros_like(head["w1"])
        head["w1"][:, 0] = step_logits - offset  # > 0, so the ReLU passes it
        head["b1"] = np.zeros_like(head["b1"])
        head["w2"] = np.zeros_like(head["w2"])
        head["w2"][0, 0] = 1.0
        head["b2"] = np.array([offset], np.float32)
        return p

    return build_model(cfg, fill), cfg


@pytest.fixture(scope="session")
def make_markov():
    return markov_model


def hf_to_msjax(hf_model):
    """Copies a transformers Qwen2ForCausalLM (untied) into a new msjax model."""
    hc = hf_model.config
    cfg = ModelConfig(
        vocab_size=hc.vocab_size,
        hidden_size=hc.hidden_size,
        intermediate_size=hc.intermediate_size,
        num_layers=hc.num_hidden_layers,
        num_heads=hc.num_attention_heads,
        num_kv_heads=hc.num_key_value_heads,
        max_position_embeddings=hc.max_position_embeddings,
        rope_theta=float(hc.rope_parameters["rope_theta"]),
        rms_norm_eps=hc.rms_norm_eps,
    )
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    c, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def layer(i):
        g = lambda name: sd[f"model.layers.{i}.{name}"]
        return {
            "attn": {
                "q_kernel": g("self_attn.q_proj.weight").T.reshape(c, h, d),
                "q_bias": g("self_attn.q_proj.bias").reshape(h, d),
                "k_kernel": g("self_attn.k_proj.weight").T.reshape(c, kv, d),
                "k_bias": g("self_attn.k_proj.bias").reshape(kv, d),
                "v_kernel": g("self_attn.v_proj.weight").T.reshape(c, kv, d),
                "v_bias": g("self_attn.v_proj.bias").reshape(kv, d),
                "o_kernel": g("self_attn.o_proj.weight").T.reshape(h, d, c),
            },
            "mlp": {
                "gate_kernel": g("mlp.gate_proj.weight").T,
                "up_kernel": g("mlp.up_proj.weight").T,
                "down_kernel": g("mlp.down_proj.weight").T,
            },
            "input_norm": {"scale": g("input_layernorm.weight")},
            "post_attn_norm": {"scale": g("post_attention_layernorm.weight")},
        }

    layers = [layer(i) for i in range(cfg.num_layers)]
    stack = lambda *xs: np.stack(xs)

    def fill(p):
        bb = p["backbone"]
        bb["embed"] = sd["model.embed_tokens.weight"]
        bb["final_norm"]["scale"] = sd["model.norm.weight"]
        bb["lm_head"] = sd["lm_head.weight"].T
        bb["layers"] = jax.tree.map(stack, *layers[:-1])
        bb["last_layer"] = layers[-1]
        return p

    return build_model(cfg, fill), cfg


@pytest.fixture(scope="session")
def hf_pair():
    """(transformers Qwen2ForCausalLM, msjax model, ModelConfig) with the same random weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters={"rope_theta": 5000.0, "rope_type": "default"},
    )
    hf = transformers.Qwen2ForCausalLM(config).eval()
    # Weights from NumPy (not torch's init order), so the test's constants stay valid.
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, p in sorted(hf.named_parameters()):
            std = 0.3 if "norm" in name else 0.15
            mean = 1.0 if "norm" in name else 0.0
            p.copy_(torch.from_numpy(mean + std * rng.standard_normal(tuple(p.shape))))
    model, cfg = hf_to_msjax(hf)
    return hf, model, cfg
