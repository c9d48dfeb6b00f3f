"""The SPRM head file of a released checkpoint: `score_module.pt` (a torch state dict of
`nn.Sequential(Linear(C, 2C), ReLU, Dropout(0.5), Linear(2C, 1))`) or `score_module.safetensors`
with the same keys (0.weight [2C, C], 0.bias [2C], 3.weight [1, 2C], 3.bias [1])."""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

from msjax.hf.keys import TensorSpec

PT_NAME = "score_module.pt"
SAFETENSORS_NAME = "score_module.safetensors"


def require_torch():
    """The torch module; ImportError with the install command when torch is missing."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading/writing {PT_NAME} needs torch: pip install 'msjax[hf]' (or provide "
            f"{SAFETENSORS_NAME} instead)."
        ) from e
    return torch


def _to_numpy(tensor) -> np.ndarray:
    torch = require_torch()
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def find_score_module(hf_dir: str | os.PathLike) -> Path | None:
    """The head file in `hf_dir`, or None; ValueError when both formats are present."""
    d = Path(hf_dir)
    found = [d / n for n in (SAFETENSORS_NAME, PT_NAME) if (d / n).is_file()]
    if len(found) > 1:
        raise ValueError(
            f"{d} holds both {SAFETENSORS_NAME} and {PT_NAME}; remove the one that is stale."
        )
    return found[0] if found else None


def read_score_module(path: str | os.PathLike, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Reads and validates the head file: exactly the keys of `specs`, each with its shape.

    Returns HF-layout numpy arrays by key. Raises ValueError naming the key for missing,
    unexpected or mis-shaped tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        arrays = load_file(str(path))
    else:
        torch = require_torch()
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle.
            raise ValueError(
                f"{path} is not a loadable torch state dict ({type(e).__name__}: {e})."
            ) from e
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise ValueError(f"{path} must hold a state dict of tensors (head.state_dict()).")
        arrays = {str(k): _to_numpy(v) for k, v in state.items()}
    expected = {s.hf_name: s for s in specs}
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: keys do not match the SPRM head nn.Sequential: missing {missing}, "
            f"unexpected {unexpected}; expected exactly {sorted(expected)}."
        )
    for key, spec in expected.items():
        if tuple(arrays[key].shape) != spec.hf_shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(arrays[key].shape)}, expected {spec.hf_shape} "
                "for this model's hidden size."
            )
    return arrays


def write_score_module(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Writes `arrays` (HF-layout, float32) as a torch state dict to `path`."""
    torch = require_torch()
    state = {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()
    }
    torch.save(state, str(path))
