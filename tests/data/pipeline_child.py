"""Fresh-process half of the pipeline resume test (run as a script by test_pipeline.py).

usage: pipeline_child.py DATA_DIR STATE_JSON OUT_NPZ NUM_BATCHES
Restores the iterator state into a new pipeline and saves the next batches.
"""

import json
import sys

import numpy as np

from msjax.data.pipeline import PromptPipeline
from msjax.data.sources import load_source
from msjax.data.synthetic_tokenizer import build_synthetic_tokenizer


def make_pipeline(data_dir: str) -> PromptPipeline:
    """The pipeline both processes build: same data, tokenizer and settings."""
    source = load_source("synthetic_steps/default", "train", data_dir)
    return PromptPipeline(
        source,
        build_synthetic_tokenizer(),
        batch_size=4,
        max_prompt_len=64,
        buckets=(24, 32, 64),
        template="plain",
        suffix=None,
        seed=11,
        num_epochs=None,
        shard_index=0,
        shard_count=1,
    )


def batches_to_arrays(batches: list[dict]) -> dict[str, np.ndarray]:
    """Batches -> flat dict of arrays for np.savez (strings as unicode arrays)."""
    out = {}
    for i, b in enumerate(batches):
        for k, v in b.items():
            out[f"{i}/{k}"] = v.astype(str) if v.dtype == object else v
    return out


def main(argv: list[str]) -> None:
    data_dir, state_path, out_path, n = argv[1], argv[2], argv[3], int(argv[4])
    it = iter(make_pipeline(data_dir))
    with open(state_path, encoding="utf-8") as f:
        it.set_state(json.load(f))
    np.savez(out_path, **batches_to_arrays([next(it) for _ in range(n)]))


if __name__ == "__main__":
    main(sys.argv)
