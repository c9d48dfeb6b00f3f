"""The msjax checkpoint directory, shared by conversion, training and inference.

    DIR/msjax.json            {"format": "msjax", "format_version": 1, "model_config": {...},
                               "head": "trained" | "imported" | "fresh"}
    DIR/tokenizer/            tokenizer files (optional; generation_config.json for the EOS list)
    DIR/checkpoints/<step>/   one orbax CheckpointManager step; item "params" holds the model's
                              nnx.State as a pure dict of arrays. The trainer adds its own items
                              (optimizer state, data-iterator state, ...) to the same steps.

`load_model` restores only the "params" item, straight onto the target mesh shardings, so a
checkpoint written on one topology loads on another. `load_any` also accepts a Hugging Face folder.

"head" says where the SPRM head came from: "trained" (by msjax; also assumed when the field is
absent, as in the trainer's workdirs), "imported" (a Hugging Face folder's score_module.pt) or
"fresh" (initialised at import from a folder without one: its scores are random).
`require_trained_head` lets the scoring tools refuse a fresh head.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import SingleDeviceSharding

from msjax.hf.export import copy_tokenizer_files, save_hf
from msjax.hf.load import load_hf
from msjax.hf.score_module import find_score_module
from msjax.models.config import DTYPES, ModelConfig
from msjax.models.reflective import ReflectiveModel, abstract_model

FORMAT = "msjax"
FORMAT_VERSION = 1
META_NAME = "msjax.json"
TOKENIZER_SUBDIR = "tokenizer"
CHECKPOINTS_SUBDIR = "checkpoints"
PARAMS_ITEM = "params"
HEAD_ORIGINS = ("trained", "imported", "fresh")
log = logging.getLogger(__name__)
_READ_ONLY = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
# ModelConfig fields that fix the parameter shapes or the function the model computes.
ARCH_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rope_theta",
    "rope_scaling_factor",
    "rms_norm_eps",
    "tie_word_embeddings",
)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store paths (gs://, s3://): read and written through etils.epath."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path (local paths made absolute); works for local and gs:// directories."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def local_copy(path: str | os.PathLike) -> Path:
    """`path` itself when local; for a remote folder, a local temporary copy of its files."""
    if not is_remote(path):
        return Path(path)
    tmp = Path(tempfile.mkdtemp(prefix="msjax-"))
    for f in epath.Path(path).iterdir():
        if f.is_file():
            (tmp / f.name).write_bytes(f.read_bytes())
    return tmp


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True when `path` holds an msjax.json (an msjax checkpoint directory)."""
    return (as_path(path) / META_NAME).is_file()


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True when `path` looks like a Hugging Face model folder (config.json + safetensors)."""
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def checkpoints_path(path: str | os.PathLike) -> epath.Path:
    """DIR/checkpoints, the CheckpointManager root."""
    return as_path(path) / CHECKPOINTS_SUBDIR


def checkpoint_manager(path: str | os.PathLike, **options: Any) -> ocp.CheckpointManager:
    """The orbax CheckpointManager of DIR/checkpoints (`options` -> CheckpointManagerOptions).

    Save with `ocp.args.Composite(params=ocp.args.StandardSave(pure_state), <other items>...)`.
    """
    return ocp.CheckpointManager(
        checkpoints_path(path), options=ocp.CheckpointManagerOptions(**options)
    )


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """DIR/msjax.json, checked; ValueError naming the problem otherwise."""
    meta_path = as_path(path) / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {path} is not an msjax checkpoint.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}).") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not an msjax checkpoint description.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format_version {meta.get('format_version')}; this msjax reads "
            f"version {FORMAT_VERSION}."
        )
    if "model_config" not in meta:
        raise ValueError(f"{meta_path} has no model_config.")
    if meta.get("head", "trained") not in HEAD_ORIGINS:
        raise ValueError(f"{meta_path}: head={meta['head']!r}; expected one of {HEAD_ORIGINS}.")
    return meta


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in DIR/msjax.json; ValueError naming the problem otherwise."""
    meta = read_meta(path)
    meta_path = as_path(path) / META_NAME
    try:
        return ModelConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: model_config: {e}") from e


def head_origin(path: str | os.PathLike) -> str:
    """Where the SPRM head of a model folder came from: "trained", "imported" or "fresh" (see
    the module docstring); ValueError when `path` is not a model folder."""
    if is_checkpoint_dir(path):
        return read_meta(path).get("head", "trained")
    if is_hf_dir(path):
        return "imported" if find_score_module(path) is not None else "fresh"
    raise ValueError(
        f"{path} is neither an msjax checkpoint directory (with {META_NAME}) nor a Hugging Face "
        "model folder (config.json + *.safetensors)."
    )


def require_trained_head(path: str | os.PathLike, allow_untrained: bool = False) -> str:
    """`head_origin(path)`; raises ValueError for a "fresh" (untrained) head unless
    `allow_untrained`, in which case it is logged."""
    origin = head_origin(path)
    if origin == "fresh":
        if not allow_untrained:
            raise ValueError(
                f"{path} has no trained SPRM head (no score_module.pt, or imported from a folder "
                "without one): its scores would be random. Add the head file, train the model, "
                "or pass --allow_untrained_head to use it anyway."
            )
        log.warning("%s: the SPRM head is untrained (random scores), as allowed.", path)
    return origin


def latest_step(path: str | os.PathLike) -> int | None:
    """The newest saved step of an msjax checkpoint directory, or None when there is none."""
    root = checkpoints_path(path)
    if not root.is_dir():
        return None
    with ocp.CheckpointManager(root, options=_READ_ONLY) as m:
        return m.latest_step()


def tokenizer_dir(path: str | os.PathLike) -> epath.Path | None:
    """Where the tokenizer files of a model live: DIR/tokenizer for an msjax checkpoint, the
    folder itself for a Hugging Face folder; None when there is no tokenizer.json."""
    p = as_path(path)
    candidate = p / TOKENIZER_SUBDIR if is_checkpoint_dir(p) else p
    return candidate if (candidate / "tokenizer.json").is_file() else None


def _check_arch(old: ModelConfig, new: ModelConfig, where: Path) -> None:
    diff = {k: (getattr(old, k), getattr(new, k)) for k in ARCH_FIELDS}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    if diff:
        raise ValueError(
            f"{where} holds a checkpoint of a different model: (saved, given) = {diff}; use "
            "another directory."
        )


def _write_tokenizer(src: str | os.PathLike, root: Path) -> None:
    if not (Path(src) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer_dir {src} has no tokenizer.json.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_SUBDIR}.tmp-", dir=root))
    try:
        copy_tokenizer_files(src, tmp)
        target = root / TOKENIZER_SUBDIR
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(
    path: str | os.PathLike,
    model_or_state,
    cfg: ModelConfig,
    *,
    step: int = 0,
    tokenizer_dir: str | os.PathLike | None = None,
    head: str = "trained",
) -> Path:
    """Saves the model parameters as step `step` of the msjax checkpoint at `path`.

    Args:
      model_or_state: a ReflectiveModel or its nnx.State (nnx.Param leaves are saved).
      cfg: its ModelConfig, written to msjax.json. An existing msjax.json must describe the same
        architecture (ValueError otherwise); it is rewritten with `cfg`.
      tokenizer_dir: a folder whose tokenizer files are copied to DIR/tokenizer.
      head: where the SPRM head came from, recorded in msjax.json (HEAD_ORIGINS).
    Raises FileExistsError when `step` is already saved. Every process of a multi-process run
    must call it (orbax saves are collective); only process 0 writes the small files.
    """
    root = Path(path).absolute()
    if head not in HEAD_ORIGINS:
        raise ValueError(f"head={head!r}; expected one of {HEAD_ORIGINS}.")
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    if is_checkpoint_dir(root):
        _check_arch(read_config(root), cfg, root)
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_config": cfg.to_dict(),
            "head": head,
        }
        _atomic_write_text(root / META_NAME, json.dumps(meta, indent=2) + "\n")
        if tokenizer_dir is not None:
            _write_tokenizer(tokenizer_dir, root)
    with checkpoint_manager(root) as mngr:
        if step in mngr.all_steps():
            raise FileExistsError(f"{root}: step {step} is already saved; pick another step.")
        mngr.save(
            step,
            args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(state.to_pure_dict())}),
        )
        mngr.wait_until_finished()
    return root


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in flat}


def load_model(
    path: str | os.PathLike,
    mesh=None,
    *,
    step: int | None = None,
    dtype: str | None = None,
    rules=None,
    **overrides: Any,
) -> tuple[ReflectiveModel, ModelConfig]:
    """Restores the "params" item of step `step` (default: the latest) of an msjax checkpoint.

    Args:
      mesh: restore each parameter directly onto its sharding on this mesh; None = first device.
      dtype: parameter and compute dtype ("float32" / "bfloat16"); None = as saved in msjax.json.
      overrides: other ModelConfig fields that do not change shapes (remat, attention, ...).
    Other items saved in the same step (optimizer state, ...) are not read. Raises ValueError
    naming the parameter when msjax.json does not match the saved arrays.
    """
    root = Path(path).absolute()
    cfg = read_config(root)
    if head_origin(root) == "fresh":
        log.warning(
            "%s: the SPRM head was freshly initialised at import (no score_module.pt); it is "
            "untrained, and training starts it from scratch.",
            root,
        )
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}.")
        overrides = {"param_dtype": dtype, "dtype": dtype, **overrides}
    cfg = cfg.replace(**overrides)
    graphdef, abstract = abstract_model(cfg, mesh, rules)
    target = abstract.to_pure_dict()
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), target
        )
    handlers = {PARAMS_ITEM: ocp.StandardCheckpointHandler()}
    with ocp.CheckpointManager(
        checkpoints_path(root),
        item_handlers=handlers,
        options=_READ_ONLY,
    ) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None or step not in mngr.all_steps():
            raise FileNotFoundError(
                f"{root}: no saved step {'' if step is None else step} in {checkpoints_path(root)} "
                f"(steps: {list(mngr.all_steps())})."
            )
        meta = mngr.item_metadata(step)
        if meta is None or meta.get(PARAMS_ITEM) is None:
            raise ValueError(f"{root}: step {step} has no '{PARAMS_ITEM}' item.")
        saved = _flat_shapes(meta[PARAMS_ITEM])
        wanted = _flat_shapes(target)
        if saved != wanted:
            keys = sorted(set(saved) | set(wanted))
            bad = [(k, saved.get(k), wanted.get(k)) for k in keys if saved.get(k) != wanted.get(k)]
            raise ValueError(
                f"{root}/{META_NAME} does not match the saved parameters of step {step}: "
                f"(name, saved shape, config shape) = {bad[:6]}; the config was edited or the "
                "directory mixes two models."
            )
        restored = mngr.restore(
            step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)})
        )[PARAMS_ITEM]
    nnx.replace_by_pure_dict(abstract, restored)
    return nnx.merge(graphdef, abstract), cfg


def load_any(
    path: str | os.PathLike, mesh=None, *, dtype: str | None = None, **kwargs: Any
) -> tuple[ReflectiveModel, ModelConfig]:
    """Loads an msjax checkpoint directory (`load_model`) or a Hugging Face folder (`load_hf`).

    dtype None means: as saved for an msjax checkpoint, float32 for a Hugging Face folder;
    "auto" means as saved for both.
    Raises ValueError when `path` is neither.
    """
    if is_checkpoint_dir(path):
        return load_model(path, mesh, dtype=None if dtype == "auto" else dtype, **kwargs)
    if is_hf_dir(path):
        return load_hf(path, mesh, dtype, **kwargs)
    raise ValueError(
        f"{path} is neither an msjax checkpoint directory (with {META_NAME}) nor a Hugging Face "
        "model folder (config.json + *.safetensors); convert it with `msjax-convert import`."
    )


def import_hf(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = "auto"
) -> ModelConfig:
    """Converts a Hugging Face folder into an msjax checkpoint at step 0 (tokenizer files and
    generation_config.json go to DIR/tokenizer). dtype "auto" keeps the checkpoint's own.
    msjax.json records the head as "imported", or "fresh" when the folder has no head file."""
    model, cfg = load_hf(hf_dir, None, dtype)
    tok = Path(hf_dir) if (Path(hf_dir) / "tokenizer.json").is_file() else None
    head = head_origin(hf_dir)
    save_model(out_dir, model, cfg, step=0, tokenizer_dir=tok, head=head)
    return cfg


def export_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str = "float32",
    shard_size: int | str = "2GB",
) -> Path:
    """Writes step `step` (default latest) of an msjax checkpoint as a Hugging Face folder
    (see `msjax.hf.save_hf`), with the checkpoint's tokenizer files; without score_module.pt
    when the head is "fresh" (untrained), so that the folder is recognised as head-less."""
    trained = head_origin(ckpt_dir) != "fresh"
    model, _ = load_model(ckpt_dir, step=step)
    if not trained:
        log.warning("%s: the SPRM head is untrained; %s holds the policy only.", ckpt_dir, out_dir)
    return save_hf(
        model,
        out_dir,
        dtype=dtype,
        shard_size=shard_size,
        tokenizer_dir=tokenizer_dir(ckpt_dir),
        head=trained,
    )
