"""`ReflectiveModel` -> a Hugging Face Qwen2ForCausalLM folder + `score_module.pt`.

The folder is built in a temporary sibling directory and renamed into place at the end, so a
crash never leaves a half export where a reader would take it for whole. Parameters are gathered
to the host one HF tensor at a time (one layer of a stacked parameter at a time); host memory
holds at most one safetensors shard.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from msjax import global_arrays
from msjax.hf.config import config_to_hf
from msjax.hf.keys import backbone_specs, head_specs
from msjax.hf.safetensors_folder import INDEX_NAME
from msjax.hf.score_module import PT_NAME, require_torch, write_score_module
from msjax.models.reflective import ReflectiveModel

NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Files of a tokenizer folder that travel with a model (generation_config.json included: it holds
# the full EOS list).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_UNITS |= {"GIB": 2**30, "TB": 10**12, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GB" (10^9), "500MB", "2GiB" (2^30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"shard size {size!r}: use a number of bytes or e.g. '2GB', '500MB'.")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"shard size {size!r} must be positive.")
    return value


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the TOKENIZER_FILES present in `src` into `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


_take_layer = jax.jit(lambda stack, i: jax.lax.dynamic_index_in_dim(stack, i, 0, keepdims=False))


def _plan_shards(specs, itemsize: int, limit: int) -> list[list]:
    """Greedy split of `specs` (in order) into shards of at most `limit` bytes (a larger tensor
    gets a shard of its own)."""
    shards: list[list] = [[]]
    used = 0
    for spec in specs:
        size = math.prod(spec.hf_shape) * itemsize
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def _token_ids(tokenizer_dir) -> tuple[int | None, int | list[int] | None]:
    if tokenizer_dir is None:
        return None, None
    from msjax.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    eos = list(tok.eos_ids)
    return tok.bos_id, (eos[0] if len(eos) == 1 else eos)


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def save_hf(
    model: ReflectiveModel,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    shard_size: int | str = "2GB",
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    head: bool = True,
) -> Path:
    """Writes `model` as a Hugging Face folder that transformers' AutoModelForCausalLM loads.

    Contents: config.json (Qwen2, `dtype` and `torch_dtype` both set), model.safetensors or
    model-0000k-of-0000N.safetensors + model.safetensors.index.json when the weights exceed
    `shard_size`, generation_config.json (copied from `tokenizer_dir` when it has one, else the
    tokenizer's BOS/EOS), the tokenizer files of `tokenizer_dir`, and, when `head`,
    score_module.pt (float32 torch state dict 0.weight, 0.bias, 3.weight, 3.bias of the original
    nn.Sequential head; head=False writes the policy only, e.g. for an untrained head).

    Args:
      dtype: "float32" or "bfloat16" for the backbone weights.
      shard_size: bytes per safetensors file (int or "2GB"/"500MB"/"2GiB").
      overwrite: replace an existing non-empty `out_dir` (only once the new folder is complete).
    Returns the output path. In a multi-process run every process must call it (gathers are
    collective); only process 0 writes.
    """
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"export dtype={dtype!r}; choose one of {sorted(NUMPY_DTYPES)}.")
    limit = parse_size(shard_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty; pass overwrite=True or pick another."
        )
    if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} has no tokenizer.json.")
    if head:
        require_torch()  # score_module.pt needs torch: fail before any work
    cfg = model.cfg
    bos, eos = _token_ids(tokenizer_dir)
    leaves = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    np_dtype = NUMPY_DTYPES[dtype]
    shards = _plan_shards(backbone_specs(cfg), np_dtype.itemsize, limit)
    writer = jax.process_index() == 0

    def host(spec, cast):
        value = leaves[spec.path]
        if spec.layer is not None:
            value = _take_layer(value, spec.layer)
        return np.ascontiguousarray(spec.to_hf(global_arrays.to_host(value)).astype(cast))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = (
        Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        if writer
        else None
    )
    try:
        n = len(shards)
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            tensors = {spec.hf_name: host(spec, np_dtype) for spec in shard}
            total += sum(t.nbytes for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, fname))
            if writer:
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        head_specs_ = head_specs(cfg) if head else []
        head_tensors = {spec.hf_name: host(spec, np.float32) for spec in head_specs_}
        if writer:
            if n > 1:
                _write_json(
                    tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map}
                )
            _write_json(tmp / "config.json", config_to_hf(cfg, dtype, bos, eos))
            copied = copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir is not None else []
            if "generation_config.json" not in copied:
                gen = {
                    k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None
                }
                _write_json(tmp / "generation_config.json", gen)
            if head:
                write_score_module(tmp / PT_NAME, head_tensors)
            _swap_into_place(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """os.replace `tmp` onto `out_dir`; an existing non-empty `out_dir` is moved aside first and
    deleted only after the new folder is in place."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
