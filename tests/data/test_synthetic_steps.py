"""synthetic_steps TFDS builder: ArrayRecord files without TensorFlow, read back by TFDS."""

import sys

import pytest
import tensorflow_datasets as tfds

from msjax.data.sources import load_source
from msjax.data.step_labels import label_steps
from msjax.data.synthetic import Difficulty, gold_solution, parse_problem
from msjax.data.synthetic_steps import SyntheticStepsConfig, build_synthetic_steps, generate_splits


def test_build_and_read_back(tmp_path):
    d = Difficulty(min_steps=2, max_steps=3)
    built = build_synthetic_steps(tmp_path, num_train=60, num_test=12, difficulty=d, seed=5)
    assert built.name == "synthetic_steps/default"
    assert dict(built.splits) == {"train": 60, "test": 12}
    assert built.metadata["params"]["seed"] == 5
    assert "tensorflow" not in sys.modules
    # Three ways to read it back, all the same records.
    via_tfds = tfds.data_source("synthetic_steps/default", data_dir=str(tmp_path), split="train")
    via_load = load_source("synthetic_steps/default", "train", tmp_path)
    via_built = built.source("train")
    assert len(via_tfds) == len(via_load) == len(via_built) == 60
    records = [via_tfds[i] for i in range(60)]
    assert records[7]["problem"] == via_load[7]["problem"] == via_built[7]["problem"]
    # The stored examples are exactly the generated ones (in TFDS's own order).
    want = generate_splits(
        SyntheticStepsConfig(name="x", num_train=60, num_test=12, difficulty=d, seed=5)
    )
    by_id = {r["id"]: r for r in records}
    for i, e in enumerate(want["train"]):
        r = by_id[i]
        assert r["problem"].decode() == e.problem and r["answer"].decode() == e.answer
        assert r["solution"].decode() == e.solution and r["num_steps"] == e.num_steps
        p = parse_problem(e.problem)
        assert e.solution == gold_solution(p) and 2 <= e.num_steps <= 3
        assert all(label_steps(p, e.solution).on_track)
    test = {load_source(built.name, "test", tmp_path)[i]["problem"] for i in range(12)}
    assert not test & {r["problem"] for r in records}


def test_reuse_mismatch_and_overwrite(tmp_path):
    a = build_synthetic_steps(tmp_path, num_train=20, num_test=5)
    b = build_synthetic_steps(tmp_path, num_train=20, num_test=5)  # reused
    assert a == b
    with pytest.raises(ValueError, match="already holds.*overwrite=True"):
        build_synthetic_steps(tmp_path, num_train=30, num_test=5)
    c = build_synthetic_steps(tmp_path, num_train=30, num_test=5, overwrite=True)
    assert c.splits["train"] == 30
    other = build_synthetic_steps(tmp_path, num_train=10, num_test=5, config_name="small")
    assert other.name == "synthetic_steps/small" and other.splits["train"] == 10
    assert load_source("synthetic_steps/default", "train", tmp_path).__len__() == 30


def test_missing_dataset_and_bad_sizes(tmp_path):
    with pytest.raises(FileNotFoundError, match="build it first"):
        load_source("synthetic_steps/default", "train", tmp_path)
    with pytest.raises(ValueError, match="num_train"):
        build_synthetic_steps(tmp_path, num_train=0)
