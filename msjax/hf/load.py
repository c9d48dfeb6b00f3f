"""Hugging Face Qwen2 folder -> `ReflectiveModel`, read one tensor at a time and placed straight
onto the mesh.

Every check (config fields, tensor names, shapes, dtypes, the head file) runs on file headers
before any parameter is allocated. Stacked layers are allocated once, already sharded, and layer
i is written in place by a jitted update that donates the stack, so neither the host nor a device
ever holds a second copy of the model.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from msjax import global_arrays
from msjax.hf.config import config_from_hf, read_config_json, source_dtype
from msjax.hf.keys import TensorSpec, backbone_specs, head_specs
from msjax.hf.safetensors_folder import SafetensorsFolder
from msjax.hf.score_module import find_score_module, read_score_module
from msjax.models.config import DTYPES, ModelConfig
from msjax.models.reflective import ReflectiveModel, abstract_model
from msjax.models.sprm import SPRMHead

log = logging.getLogger(__name__)

FLOAT_TAGS = ("F32", "BF16", "F16", "F64")


def resolve_dtype(dtype: str | None, hf_config: dict) -> str:
    """None -> "float32"; "auto" -> the checkpoint's own dtype (float16 widened to float32)."""
    if dtype is None:
        return "float32"
    if dtype == "auto":
        return source_dtype(hf_config)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)} or 'auto'.")
    return dtype


def _first(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_tensors(folder: SafetensorsFolder, specs: list[TensorSpec], cfg: ModelConfig) -> None:
    """Raises ValueError naming the key for missing, unexpected, mis-shaped or non-float tensors.

    A tied model may still carry `lm_head.weight` (some exporters write it); it is accepted only
    if it equals the embedding table bit for bit, checked here.
    """
    where = folder.dir
    expected = {s.hf_name: s for s in specs}
    present = folder.names()
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(
            f"{where}: tensor(s) missing from the safetensors files: {_first(missing)} "
            f"({len(missing)} in all); the checkpoint does "
            f"not match config.json (num_hidden_layers={cfg.num_layers}, "
            f"tie_word_embeddings={cfg.tie_word_embeddings})."
        )
    unexpected = sorted(present - set(expected))
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")
        lm = folder.get("lm_head.weight")
        embed = folder.get("model.embed_tokens.weight")
        if lm.dtype != embed.dtype or not np.array_equal(lm.view(np.uint8), embed.view(np.uint8)):
            raise ValueError(
                f"{where}: config.json has tie_word_embeddings=true but lm_head.weight "
                f"({folder.file_of('lm_head.weight')}) differs from model.embed_tokens.weight; "
                "set tie_word_embeddings to false if the LM head is trained separately."
            )
        log.info("%s: lm_head.weight equals the embedding table (tied); it is not read.", where)
    if unexpected:
        raise ValueError(
            f"{where}: unexpected tensor(s) {_first(unexpected)} ({len(unexpected)} in all)"
            f" that a Qwen2ForCausalLM with this config.json does not "
            "have; remove them or fix config.json."
        )
    for name, spec in expected.items():
        shape = folder.shape(name)
        if shape != spec.hf_shape:
            raise ValueError(
                f"{where}: tensor {name} ({folder.file_of(name)}) has shape {shape}, expected "
                f"{spec.hf_shape} from config.json."
            )
        tag = folder.dtype(name)
        if tag not in FLOAT_TAGS:
            raise ValueError(
                f"{where}: tensor {name} has dtype {tag}; msjax reads float weights only "
                f"({', '.join(FLOAT_TAGS)})."
            )


def _slice_sharding(sharding):
    """The sharding of one layer of a stacked array with `sharding`."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


@functools.lru_cache(maxsize=256)
def _zeros(shape, dtype, sharding):
    """A jitted constructor of zeros created directly with `sharding` (cached across loads)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=64)
def _layer_setter(sharding):
    """stack[i] = x in place (the stack is donated), keeping `sharding` (cached across loads)."""
    return jax.jit(
        lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x.astype(stack.dtype), i, 0),
        donate_argnums=0,
        out_shardings=sharding,
    )


@functools.lru_cache(maxsize=16)
def _head_init(cfg: ModelConfig, shardings: tuple):
    """Jitted PRNG key -> SPRM head parameters {name: array} created with `shardings` (cached)."""

    def init(key):
        head = SPRMHead(
            cfg.hidden_size,
            rngs=nnx.Rngs(key),
            dropout=cfg.head_dropout,
            grad_scale=cfg.head_grad_scale,
            param_dtype=cfg.jnp_param_dtype,
        )
        return nnx.state(head).to_pure_dict()

    return jax.jit(init, out_shardings=dict(shardings))


def place(host: np.ndarray, sharding) -> jax.Array:
    """A host array onto `sharding`; each device receives only its own shard."""
    return global_arrays.to_global(host, sharding)


class StatePlacer:
    """Fills the leaves of an abstract nnx state with device arrays, one tensor at a time."""

    def __init__(self, abstract_state, mesh=None):
        self.abstract = abstract_state
        self.leaves = {path: var for path, var in nnx.to_flat_state(abstract_state)}
        default = SingleDeviceSharding(jax.local_devices()[0])
        self.shardings = {
            path: (var.get_value().sharding if mesh is not None else default)
            for path, var in self.leaves.items()
        }
        self.values: dict[tuple, jax.Array] = {}

    def put(self, spec: TensorSpec, hf_array: np.ndarray) -> None:
        """Converts one HF-layout array with `spec` and stores it (into layer `spec.layer`)."""
        path = spec.path
        target = self.leaves[path].get_value()
        arr = np.asarray(spec.to_msjax(hf_array)).astype(target.dtype)
        sharding = self.shardings[path]
        if spec.layer is None:
            assert arr.shape == target.shape, (spec.hf_name, arr.shape, target.shape)
            self.values[path] = place(arr, sharding)
            return
        assert arr.shape == target.shape[1:], (spec.hf_name, arr.shape, target.shape)
        if path not in self.values:
            self.values[path] = _zeros(target.shape, target.dtype, sharding)()
        layer = place(arr, _slice_sharding(sharding))
        self.values[path] = _layer_setter(sharding)(
            self.values[path], layer, jnp.asarray(spec.layer, jnp.int32)
        )

    def init_head(self, cfg: ModelConfig, seed: int) -> None:
        """A freshly initialised SPRM head (torch nn.Linear init), created already sharded."""
        shardings = tuple(sorted((p[1], s) for p, s in self.shardings.items() if p[0] == "head"))
        for name, value in _head_init(cfg, shardings)(jax.random.key(seed)).items():
            self.values[("head", name)] = value

    def state(self):
        """The filled nnx state; AssertionError if a leaf was never written."""
        unfilled = sorted("/".join(p) for p in set(self.leaves) - set(self.values))
        assert not unfilled, f"parameters never loaded: {unfilled}"
        pure: dict = {}
        for path, value in self.values.items():
            node = pure
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        state = jax.tree.map(lambda x: x, self.abstract)
        nnx.replace_by_pure_dict(state, pure)
        return state


def load_hf(
    hf_dir: str | os.PathLike,
    mesh=None,
    dtype: str | None = None,
    *,
    rules=None,
    seed: int = 0,
    **overrides,
) -> tuple[ReflectiveModel, ModelConfig]:
    """Loads a Hugging Face Qwen2ForCausalLM folder (+ SPRM head file) as a ReflectiveModel.

    Args:
      hf_dir: folder with config.json, model.safetensors or model-*.safetensors (+ index), and
        optionally score_module.pt / score_module.safetensors. Without a head file the head is
        freshly initialised from `seed` (logged).
      mesh: place every parameter with its sharding on this mesh; None = the first device.
      dtype: parameter and compute dtype: None = float32, "auto" = the checkpoint's own
        (float16 widened to float32), or "float32" / "bfloat16".
      rules: logical-axis rules (default msjax.sharding.RULES).
      overrides: other ModelConfig fields (remat, attention, param_dtype, ...).
    Returns (model, config). Raises FileNotFoundError / ValueError naming the file, field or
    tensor for anything missing, unexpected, mis-shaped or unsupported.
    """
    hf_dir = Path(hf_dir)
    hf_config = read_config_json(hf_dir)
    name = resolve_dtype(dtype, hf_config)
    fields = {"param_dtype": name, "dtype": name, **overrides}
    cfg = config_from_hf(hf_config, where=str(hf_dir / "config.json"), **fields)
    folder = SafetensorsFolder(hf_dir)
    specs = backbone_specs(cfg)
    check_tensors(folder, specs, cfg)
    head_file = find_score_module(hf_dir)
    head = read_score_module(head_file, head_specs(cfg)) if head_file is not None else None

    graphdef, abstract = abstract_model(cfg, mesh, rules)
    placer = StatePlacer(abstract, mesh)
    for spec in specs:
        placer.put(spec, folder.get(spec.hf_name))
    folder.close()
    if head is not None:
        for spec in head_specs(cfg):
            placer.put(spec, head.pop(spec.hf_name))
    else:
        log.warning(
            "%s has no score_module.pt/.safetensors: the SPRM head is freshly initialised "
            "(untrained; its scores mean nothing until it is trained).",
            hf_dir,
        )
        placer.init_head(cfg, seed)
    return nnx.merge(graphdef, placer.state()), cfg
