"""The one table that maps Hugging Face tensor names to msjax parameter paths, with the per-key
layout transforms. Import and export both read it.

HF stores torch `nn.Linear` weights as [out, in]; msjax stores kernels as [in, out] with the head
axes split out: q_proj.weight [H*D, C] <-> attn/q_kernel [C, H, D], o_proj.weight [C, H*D] <->
attn/o_kernel [H, D, C], q_proj.bias [H*D] <-> attn/q_bias [H, D]. Layers 0..L-2 live stacked in
`backbone/layers/...` (index = layer), layer L-1 in `backbone/last_layer/...`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from msjax.models.config import ModelConfig

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it lives in msjax.

    hf_name: the HF key; path: the msjax nnx state path; layer: index into the stacked leading
    axis of `path` (None for unstacked parameters); hf_shape: the HF tensor shape;
    to_msjax / to_hf: array layout transforms (numpy, one tensor, no dtype change).
    """

    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    hf_shape: tuple[int, ...]
    to_msjax: Transform
    to_hf: Transform


def _identity() -> tuple[Transform, Transform]:
    return (lambda w: w), (lambda w: w)


def _transpose() -> tuple[Transform, Transform]:
    return (lambda w: w.T), (lambda w: w.T)


def _in_heads(c: int, n: int, d: int) -> tuple[Transform, Transform]:
    """[n*d, c] <-> [c, n, d] (q/k/v projections)."""
    return (lambda w: w.T.reshape(c, n, d)), (lambda k: k.reshape(c, n * d).T)


def _bias_heads(n: int, d: int) -> tuple[Transform, Transform]:
    """[n*d] <-> [n, d]."""
    return (lambda b: b.reshape(n, d)), (lambda b: b.reshape(n * d))


def _out_heads(c: int, n: int, d: int) -> tuple[Transform, Transform]:
    """[c, n*d] <-> [n, d, c] (o_proj)."""
    return (lambda w: w.T.reshape(n, d, c)), (lambda k: k.reshape(n * d, c).T)


def _layer_rules(cfg: ModelConfig):
    """(HF suffix, path inside a layer, HF shape, (to_msjax, to_hf)) per decoder-layer tensor."""
    c, h, kv, d, m = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    return [
        ("self_attn.q_proj.weight", ("attn", "q_kernel"), (h * d, c), _in_heads(c, h, d)),
        ("self_attn.q_proj.bias", ("attn", "q_bias"), (h * d,), _bias_heads(h, d)),
        ("self_attn.k_proj.weight", ("attn", "k_kernel"), (kv * d, c), _in_heads(c, kv, d)),
        ("self_attn.k_proj.bias", ("attn", "k_bias"), (kv * d,), _bias_heads(kv, d)),
        ("self_attn.v_proj.weight", ("attn", "v_kernel"), (kv * d, c), _in_heads(c, kv, d)),
        ("self_attn.v_proj.bias", ("attn", "v_bias"), (kv * d,), _bias_heads(kv, d)),
        ("self_attn.o_proj.weight", ("attn", "o_kernel"), (c, h * d), _out_heads(c, h, d)),
        ("mlp.gate_proj.weight", ("mlp", "gate_kernel"), (m, c), _transpose()),
        ("mlp.up_proj.weight", ("mlp", "up_kernel"), (m, c), _transpose()),
        ("mlp.down_proj.weight", ("mlp", "down_kernel"), (c, m), _transpose()),
        ("input_layernorm.weight", ("input_norm", "scale"), (c,), _identity()),
        ("post_attention_layernorm.weight", ("post_attn_norm", "scale"), (c,), _identity()),
    ]


def backbone_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the HF Qwen2ForCausalLM state dict, in HF save order."""
    c, v = cfg.hidden_size, cfg.vocab_size
    specs = [
        TensorSpec("model.embed_tokens.weight", ("backbone", "embed"), None, (v, c), *_identity())
    ]
    for i in range(cfg.num_layers):
        stacked = i < cfg.num_layers - 1
        base = ("backbone", "layers") if stacked else ("backbone", "last_layer")
        for suffix, sub, shape, (fwd, inv) in _layer_rules(cfg):
            specs.append(
                TensorSpec(
                    f"model.layers.{i}.{suffix}",
                    base + sub,
                    i if stacked else None,
                    shape,
                    fwd,
                    inv,
                )
            )
    specs.append(
        TensorSpec(
            "model.norm.weight", ("backbone", "final_norm", "scale"), None, (c,), *_identity()
        )
    )
    if not cfg.tie_word_embeddings:
        specs.append(
            TensorSpec("lm_head.weight", ("backbone", "lm_head"), None, (v, c), *_transpose())
        )
    return specs


def head_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The SPRM head as the original `nn.Sequential(Linear(C, 2C), ReLU, Dropout, Linear(2C, 1))`
    state dict: keys 0.weight [2C, C], 0.bias [2C], 3.weight [1, 2C], 3.bias [1]."""
    c2 = 2 * cfg.hidden_size
    return [
        TensorSpec("0.weight", ("head", "w1"), None, (c2, cfg.hidden_size), *_transpose()),
        TensorSpec("0.bias", ("head", "b1"), None, (c2,), *_identity()),
        TensorSpec("3.weight", ("head", "w2"), None, (1, c2), *_transpose()),
        TensorSpec("3.bias", ("head", "b2"), None, (1,), *_identity()),
    ]
