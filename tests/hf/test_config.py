"""HF config.json <-> ModelConfig: both transformers layouts, round trip, and one test per error."""

import json

import pytest
from transformers import AutoConfig

from msjax.hf.config import config_from_hf, config_to_hf, read_config_json, source_dtype
from msjax.models import ModelConfig

V5 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 64,
    "hidden_size": 40,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 5,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "dtype": "bfloat16",
    "use_sliding_window": False,
    "sliding_window": None,
    "layer_types": ["full_attention"] * 3,
}
V4 = {
    **{k: v for k, v in V5.items() if k not in ("rope_parameters", "dtype", "layer_types")},
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "torch_dtype": "bfloat16",
    "sliding_window": 4096,
}
EXPECTED = ModelConfig(
    vocab_size=64,
    hidden_size=40,
    intermediate_size=48,
    num_layers=3,
    num_heads=5,
    num_kv_heads=1,
    max_position_embeddings=1024,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize("layout", [V5, V4], ids=["transformers5", "transformers4"])
def test_both_layouts_map_to_the_same_config(layout):
    assert config_from_hf(layout) == EXPECTED
    assert source_dtype(layout) == "bfloat16"
    assert EXPECTED.head_dim == 8


def test_defaults_and_dtype_resolution():
    minimal = {k: V4[k] for k in ("vocab_size", "hidden_size", "intermediate_size")}
    minimal |= {"num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = config_from_hf(minimal)
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (4, 10000.0, False)
    assert source_dtype(minimal) == "float32"
    assert source_dtype({"torch_dtype": "float16"}) == "float32"  # widened, not narrowed
    with pytest.raises(ValueError, match="dtype='int8'"):
        source_dtype({"dtype": "int8"})


def test_overrides_set_msjax_fields():
    cfg = config_from_hf(V5, param_dtype="bfloat16", remat="full")
    assert (cfg.param_dtype, cfg.remat, cfg.hidden_size) == ("bfloat16", "full", 40)


@pytest.mark.parametrize(
    "spec",
    [
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}},
        {"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}},
        {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ],
)
def test_linear_rope_scaling_maps_to_factor(spec):
    base = {k: v for k, v in V4.items() if k not in ("rope_theta", "rope_scaling")}
    cfg = config_from_hf({**base, **spec})
    assert (cfg.rope_theta, cfg.rope_scaling_factor) == (1e6, 4.0)


def test_round_trip_through_hf_dict_and_transformers(tmp_path):
    cfg = EXPECTED.replace(rope_scaling_factor=2.0, head_dim=16)
    d = config_to_hf(cfg, "bfloat16", bos_token_id=1, eos_token_id=[2, 3])
    assert config_from_hf(d) == cfg
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.head_dim == 16 and hf.num_key_value_heads == 1 and hf.tie_word_embeddings
    assert hf.rope_parameters["rope_type"] == "linear" and hf.rope_parameters["factor"] == 2.0
    assert hf.rope_parameters["rope_theta"] == 500000.0 and str(hf.dtype) == "torch.bfloat16"
    assert hf.eos_token_id == [2, 3] and hf.bos_token_id == 1
    # what transformers writes back still maps to the same config
    hf.save_pretrained(tmp_path / "again")
    assert config_from_hf(read_config_json(tmp_path / "again")) == cfg


# ---------------------------------------------------------------- one test per bad input


def test_error_non_qwen2_architecture():
    with pytest.raises(ValueError, match=r"architectures=\['LlamaForCausalLM'\].*Qwen2ForCausalLM"):
        config_from_hf({**V5, "architectures": ["LlamaForCausalLM"]})


def test_error_non_qwen2_model_type():
    with pytest.raises(ValueError, match="model_type='qwen3'"):
        config_from_hf({**V5, "model_type": "qwen3"})


def test_error_sliding_window():
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        config_from_hf({**V4, "use_sliding_window": True})
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf({**V5, "layer_types": ["full_attention", "sliding_attention"] * 2})


@pytest.mark.parametrize(
    "spec, field",
    [
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
            "rope_parameters",
        ),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ],
)
def test_error_unsupported_rope_scaling(spec, field):
    base = {k: v for k, v in V4.items() if k != "rope_scaling"}
    with pytest.raises(ValueError, match=rf"{field} type '\w+' is not implemented"):
        config_from_hf({**base, **spec})


def test_error_conflicting_rope_fields():
    with pytest.raises(ValueError, match="rope_theta=10000.0 and rope_parameters.rope_theta"):
        config_from_hf({**V5, "rope_theta": 10000.0})


def test_error_missing_required_field():
    d = {k: v for k, v in V5.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match=r"required field\(s\) \['intermediate_size'\]"):
        config_from_hf(d)


def test_error_other_activation_and_quantization():
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf({**V5, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="quantization_config"):
        config_from_hf({**V5, "quantization_config": {"quant_method": "awq"}})


def test_error_inconsistent_shapes_name_the_file():
    with pytest.raises(ValueError, match="my/config.json: .*num_kv_heads"):
        config_from_hf({**V5, "num_key_value_heads": 2}, where="my/config.json")


def test_error_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_config_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config_json(tmp_path)
