"""TFDS builder `synthetic_steps`: the synthetic step task as ArrayRecord train/test splits.

Features: problem, answer, solution (text; `bytes` when read back), num_steps (int32), id (int64,
the generation order). Test problems never occur in train.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from msjax.data.sources import ArrayRecordBuilder, BuiltDataset, prepare, quiet
from msjax.data.synthetic import Difficulty, Example, generate_examples

VERSION = tfds.core.Version("1.0.0")


@dataclasses.dataclass(eq=False)
class SyntheticStepsConfig(tfds.core.BuilderConfig):
    """Sizes, difficulty and seed of one synthetic_steps build."""

    num_train: int = 10_000
    num_test: int = 500
    difficulty: Difficulty = dataclasses.field(default_factory=Difficulty)
    seed: int = 0

    def params(self) -> dict:
        return {
            "num_train": self.num_train,
            "num_test": self.num_test,
            "difficulty": dataclasses.asdict(self.difficulty),
            "seed": self.seed,
        }


def generate_splits(config: SyntheticStepsConfig) -> dict[str, list[Example]]:
    """The examples of both splits (deterministic in the config; test excludes train problems)."""
    d = config.difficulty
    train = generate_examples(config.num_train, d, np.random.default_rng([config.seed, 0]))
    seen = {e.problem for e in train}
    test = generate_examples(config.num_test, d, np.random.default_rng([config.seed, 1]), seen)
    return {"train": train, "test": test}


class SyntheticSteps(ArrayRecordBuilder, skip_registration=True):
    """Multi-step arithmetic chains with gold step-by-step solutions."""

    VERSION = VERSION

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic multi-step arithmetic problems with gold step solutions.",
            features=tfds.features.FeaturesDict(
                {
                    "problem": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "solution": tfds.features.Text(),
                    "num_steps": np.int32,
                    "id": np.int64,
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = generate_splits(self.builder_config)
        return {name: self._generate_examples(name, exs) for name, exs in splits.items()}

    def _generate_examples(self, split, examples):
        for i, e in enumerate(examples):
            record = dataclasses.asdict(e)
            yield f"{split}-{i:09d}", {**record, "id": i}


def build_synthetic_steps(
    data_dir: str | os.PathLike,
    *,
    num_train: int = 10_000,
    num_test: int = 500,
    difficulty: Difficulty | None = None,
    seed: int = 0,
    config_name: str = "default",
    overwrite: bool = False,
    progress: bool = False,
) -> BuiltDataset:
    """Prepares `synthetic_steps/<config_name>` under `data_dir` (reused when already built with
    the same parameters). Read it with `.source(split)`, `load_source(name, split, data_dir)` or
    `tfds.data_source(name, data_dir=data_dir)`."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train}, {num_test}")
    config = SyntheticStepsConfig(
        name=config_name,
        version=VERSION,
        description="synthetic step task",
        num_train=num_train,
        num_test=num_test,
        difficulty=difficulty or Difficulty(),
        seed=seed,
    )
    with quiet(not progress):
        builder = SyntheticSteps(
            config=config, data_dir=os.fspath(data_dir), file_format="array_record"
        )
        return prepare(builder, config.params(), overwrite=overwrite)
