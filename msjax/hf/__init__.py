"""Hugging Face interoperability: Qwen2 config mapping, tensor key table, import and export."""

from msjax.hf.config import config_from_hf, config_to_hf, read_config_json
from msjax.hf.export import parse_size, save_hf
from msjax.hf.keys import TensorSpec, backbone_specs, head_specs
from msjax.hf.load import load_hf

__all__ = [
    "TensorSpec",
    "backbone_specs",
    "config_from_hf",
    "config_to_hf",
    "head_specs",
    "load_hf",
    "parse_size",
    "read_config_json",
    "save_hf",
]
