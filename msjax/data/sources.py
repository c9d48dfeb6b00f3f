"""Preparing TFDS datasets as ArrayRecord files (no TensorFlow) and reading them back.

`tfds.core.GeneratorBasedBuilder.download_and_prepare(file_format="array_record")` works without
TensorFlow (tensorflow-datasets 4.9.10); only `tfds.load` / `as_dataset` need it. msjax's builders
are not registered with TFDS (`skip_registration=True`), so TFDS reads their output from the files
alone: `tfds.data_source("synthetic_steps/<config>", data_dir=...)` or `load_source`. Records come
back as dicts of NumPy values, text features as UTF-8 `bytes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of msjax's builders: unregistered, and without a code path (no checksums file; this
    also sidesteps tfds 4.9.10 looking up the `importlib_resources` backport, which is absent on
    Python >= 3.9, for builders defined in a package)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Silences TFDS's console chatter (banner on stdout, progress bars, absl info/warnings);
    the progress bars are switched back on (TFDS's default) afterwards."""
    if not enabled:
        yield
        return
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logger.setLevel(level)
        tfds.display_progress_bar(True)


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
    """A prepared dataset: `name` ("builder/config"), its `data_dir`, the version folder `path`,
    split sizes and the build metadata (parameters, read summary)."""

    name: str
    data_dir: str
    path: str
    splits: Mapping[str, int]
    metadata: Mapping[str, Any]

    def source(self, split: str):
        """The split as a random-access `tfds` ArrayRecord data source."""
        return tfds.builder_from_directory(self.path).as_data_source(split=split)


def _stored_metadata(path: Path) -> dict[str, Any] | None:
    meta = path / "metadata.json"
    if not (path / "dataset_info.json").is_file():
        return None
    if not meta.is_file():
        return {}
    with open(meta, encoding="utf-8") as f:
        return json.load(f)


def prepare(
    builder: tfds.core.GeneratorBasedBuilder,
    params: Mapping[str, Any],
    *,
    overwrite: bool = False,
    manual_dir: str | os.PathLike | None = None,
) -> BuiltDataset:
    """Writes `builder`'s splits (made with file_format="array_record") unless a build with the
    same `params` is already there. A finished build with other params raises (or is replaced with
    overwrite=True); an unfinished one is replaced. `params` must be JSON-serialisable; it is
    stored as metadata["params"]."""
    path = Path(builder.data_dir)
    params = json.loads(json.dumps(dict(params)))  # normalise tuples, check serialisable
    stored = _stored_metadata(path)
    if stored is not None and stored.get("params") != params:
        if not overwrite:
            raise ValueError(
                f"{path} already holds {builder.name}/{builder.builder_config.name} built with "
                f"{stored.get('params')}, not {params}; choose another config name or data_dir, "
                "or pass overwrite=True"
            )
        shutil.rmtree(path)
    elif stored is None and path.exists():
        shutil.rmtree(path)  # an unfinished build: TFDS renames its temp folder only at the end
    builder.info.metadata["params"] = params
    config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else str(manual_dir)
    )
    builder.download_and_prepare(download_config=config)
    return built(builder.data_dir)


def built(path: str | os.PathLike) -> BuiltDataset:
    """Describes the prepared dataset in the version folder `path`."""
    b = tfds.builder_from_directory(str(path))
    config = b.builder_config.name if b.builder_config else None
    name = f"{b.name}/{config}" if config else b.name
    data_dir = Path(path).parents[1 if config else 0].parent
    return BuiltDataset(
        name=name,
        data_dir=str(data_dir),
        path=str(path),
        splits={k: v.num_examples for k, v in b.info.splits.items()},
        metadata=dict(b.info.metadata or {}),
    )


def load_source(name: str, split: str, data_dir: str | os.PathLike):
    """The `split` of prepared dataset `name` ("synthetic_steps/<config>", "local_math/<config>")
    under `data_dir` as a random-access data source (what `tfds.data_source` returns)."""
    try:
        return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)
    except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, AssertionError) as e:
        raise FileNotFoundError(
            f"no prepared dataset {name!r} under {data_dir}: build it first with "
            "msjax.data.build_synthetic_steps / msjax.data.build_local_math "
            f"(the name is 'builder/config'); TFDS said: {e}"
        ) from e
