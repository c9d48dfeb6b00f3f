"""Lazy, one-tensor-at-a-time access to the `*.safetensors` files of a Hugging Face folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
HEAD_NAMES = ("score_module.safetensors",)


class SafetensorsFolder:
    """Maps tensor names to the files of an HF folder (via model.safetensors.index.json when
    present, else every `*.safetensors` file but the score head) and reads one tensor at a time.

    Only headers are read up front: `names`, `shape` and `dtype` cost no tensor data.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self._handles: dict[str, object] = {}
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} has no valid 'weight_map' ({e}); fix the index.") from e
            for fname in sorted(set(weight_map.values())):
                if not (self.dir / fname).is_file():
                    raise FileNotFoundError(f"{index} lists {fname}, which is not in {self.dir}.")
            self._file_of = dict(weight_map)
        else:
            files = sorted(
                p.name for p in self.dir.glob("*.safetensors") if p.name not in HEAD_NAMES
            )
            if not files:
                raise FileNotFoundError(
                    f"no *.safetensors weights in {self.dir}; msjax reads the safetensors format "
                    "(re-save the model with save_pretrained(safe_serialization=True))."
                )
            self._file_of = {}
            for fname in files:
                for name in self._open(fname).keys():  # noqa: SIM118 - safe_open is not iterable
                    if name in self._file_of:
                        raise ValueError(
                            f"tensor {name!r} is in both {self._file_of[name]} and {fname} of "
                            f"{self.dir}; remove the duplicate file or add {INDEX_NAME}."
                        )
                    self._file_of[name] = fname
        self._check_index_matches_files()

    def _open(self, fname: str):
        if fname not in self._handles:
            path = self.dir / fname
            try:
                self._handles[fname] = safe_open(str(path), framework="np")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(
                    f"cannot read the weights file {path} ({e}); it is truncated or not a "
                    "safetensors file: download or copy it again"
                ) from e
        return self._handles[fname]

    def _check_index_matches_files(self) -> None:
        keys = {f: set(self._open(f).keys()) for f in set(self._file_of.values())}
        for name, fname in self._file_of.items():
            if name not in keys[fname]:
                raise ValueError(
                    f"{INDEX_NAME} maps tensor {name!r} to {fname}, which does not hold it."
                )

    def names(self) -> set[str]:
        """All tensor names."""
        return set(self._file_of)

    def file_of(self, name: str) -> str:
        """The file name holding tensor `name`."""
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header (no data read)."""
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors dtype tag (F32, BF16, F16, ...) from the header."""
        return self._open(self._file_of[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray:
        """Reads one tensor into host memory (bfloat16 as an ml_dtypes numpy array)."""
        fname = self._file_of[name]
        try:
            return self._open(fname).get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors / OS errors on a damaged file
            raise ValueError(
                f"cannot read tensor {name} from {self.dir / fname} ({e}); download or copy the "
                "file again"
            ) from e

    def close(self) -> None:
        """Drops the open file handles."""
        self._handles.clear()
