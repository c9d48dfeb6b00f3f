"""Hugging Face Qwen2 `config.json` <-> `ModelConfig`.

Reads both layouts: transformers 4 (top-level `rope_theta`, `rope_scaling`, `torch_dtype`) and
transformers 5 (`rope_parameters: {rope_type, rope_theta, ...}`, `dtype`). Writes a config that both
read: `rope_parameters` plus the top-level `rope_theta` / `rope_scaling`, `dtype` plus
`torch_dtype`. Anything msjax does not implement (another architecture, sliding-window attention,
a RoPE scaling other than none/default/linear, quantised weights, an activation other than SiLU)
raises ValueError naming the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from msjax.models.config import ModelConfig

ARCHITECTURE = "Qwen2ForCausalLM"
MODEL_TYPE = "qwen2"
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# HF dtype names -> the msjax parameter dtype that holds them without loss.
SOURCE_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}


def read_config_json(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of an HF folder (FileNotFoundError/ValueError if absent/bad)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a Hugging Face model folder needs config.json next to its "
            "*.safetensors files (save the model with save_pretrained)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix the file.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def _rope_spec(spec: Any, field: str, where: str) -> float:
    """The linear scaling factor of one RoPE dict (1.0 for none/default)."""
    if spec is None:
        return 1.0
    if not isinstance(spec, dict) or any(isinstance(v, dict) for v in spec.values()):
        raise ValueError(
            f"{where}: {field}={spec!r} must be one flat dict or null; msjax supports a single "
            "RoPE setting for all layers."
        )
    kind = spec.get("rope_type", spec.get("type")) or "default"
    if kind == "default":
        return 1.0
    if kind == "linear":
        if "factor" not in spec:
            raise ValueError(f"{where}: {field} of type 'linear' needs a 'factor'.")
        return float(spec["factor"])
    raise ValueError(
        f"{where}: {field} type {kind!r} is not implemented by msjax (supported: default, "
        "linear); use a checkpoint without this RoPE scaling."
    )


def _rope(d: dict[str, Any], where: str) -> tuple[float, float]:
    """(rope_theta, linear scaling factor) from either layout (both must agree if both exist)."""
    params, scaling = d.get("rope_parameters"), d.get("rope_scaling")
    factor = _rope_spec(params, "rope_parameters", where)
    if scaling is not None:
        old = _rope_spec(scaling, "rope_scaling", where)
        if params is not None and old != factor:
            raise ValueError(
                f"{where}: rope_scaling={scaling!r} and rope_parameters={params!r} disagree; "
                "keep one."
            )
        factor = old
    theta = d.get("rope_theta")
    new_theta = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is not None and new_theta is not None and float(theta) != float(new_theta):
        raise ValueError(
            f"{where}: rope_theta={theta} and rope_parameters.rope_theta={new_theta} disagree; "
            "keep one."
        )
    theta = new_theta if new_theta is not None else theta
    return float(10000.0 if theta is None else theta), factor


def source_dtype(d: dict[str, Any]) -> str:
    """The msjax dtype that holds the checkpoint's declared dtype (`dtype` or `torch_dtype`)
    without loss: float32 when undeclared or float16."""
    name = d.get("dtype", d.get("torch_dtype")) or "float32"
    if name not in SOURCE_DTYPES:
        raise ValueError(
            f"config.json dtype={name!r} is not supported; expected one of {sorted(SOURCE_DTYPES)}."
        )
    return SOURCE_DTYPES[name]


def config_from_hf(d: dict[str, Any], where: str = "config.json", **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a parsed HF Qwen2 config (either layout).

    `overrides` set msjax-only fields (param_dtype, dtype, remat, attention, ...) or replace
    mapped ones. Raises ValueError naming the field for anything unsupported or missing.
    """
    archs = d.get("architectures")
    if archs is not None and archs != [ARCHITECTURE]:
        raise ValueError(
            f"{where}: architectures={archs!r}; msjax loads only {ARCHITECTURE!r} checkpoints."
        )
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(
            f"{where}: model_type={d.get('model_type')!r}; msjax loads only {MODEL_TYPE!r}."
        )
    missing = [k for k in REQUIRED if d.get(k) is None]
    if missing:
        raise ValueError(f"{where}: required field(s) {missing} are missing; add them.")
    if d.get("use_sliding_window"):
        raise ValueError(
            f"{where}: use_sliding_window=true is not implemented by msjax; only full attention "
            "is (set it to false if the model was trained with full attention)."
        )
    layer_types = d.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"{where}: layer_types={layer_types!r}; msjax implements only 'full_attention'."
        )
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={d['hidden_act']!r}; Qwen2 in msjax uses 'silu'.")
    if d.get("quantization_config") is not None:
        raise ValueError(
            f"{where}: quantization_config is set; msjax loads only unquantised weights."
        )
    theta, factor = _rope(d, where)
    fields = dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        rope_theta=theta,
        rope_scaling_factor=factor,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=float(d.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def config_to_hf(
    cfg: ModelConfig,
    dtype: str = "float32",
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> dict[str, Any]:
    """The `config.json` dict of a Qwen2ForCausalLM with `cfg`'s shapes, stored in `dtype`."""
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    scaling = None
    if cfg.rope_scaling_factor != 1.0:
        rope = {**rope, "rope_type": "linear", "factor": cfg.rope_scaling_factor}
        scaling = {"type": "linear", "rope_type": "linear", "factor": cfg.rope_scaling_factor}
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        out["head_dim"] = cfg.head_dim
    return out
