"""Data: the synthetic step task, TFDS builders (ArrayRecord, no TensorFlow), grain pipelines.

Public API re-exported here; see each module for details.
"""

from msjax.data.local_math import ReadSummary, build_local_math, read_math_files
from msjax.data.pipeline import (
    DataIterator,
    PromptPipeline,
    SftPipeline,
    bucket_length,
    default_buckets,
    gold_response,
)
from msjax.data.sources import BuiltDataset, load_source
from msjax.data.step_labels import (
    STEP_ERRORS,
    StepLabels,
    TokenStepLabels,
    first_error,
    label_step_texts,
    label_steps,
    split_steps,
    step_positions,
    token_step_labels,
)
from msjax.data.synthetic import (
    ERROR_KINDS,
    Difficulty,
    Example,
    FlawedSolution,
    MixedSolutions,
    Problem,
    flawed_solution,
    generate_examples,
    gold_solution,
    parse_problem,
    sample_problem,
)
from msjax.data.synthetic_steps import build_synthetic_steps
from msjax.data.synthetic_tokenizer import build_synthetic_tokenizer

__all__ = [
    "ERROR_KINDS",
    "STEP_ERRORS",
    "BuiltDataset",
    "DataIterator",
    "Difficulty",
    "Example",
    "FlawedSolution",
    "MixedSolutions",
    "Problem",
    "PromptPipeline",
    "ReadSummary",
    "SftPipeline",
    "StepLabels",
    "TokenStepLabels",
    "bucket_length",
    "build_local_math",
    "build_synthetic_steps",
    "build_synthetic_tokenizer",
    "default_buckets",
    "first_error",
    "flawed_solution",
    "generate_examples",
    "gold_response",
    "gold_solution",
    "label_step_texts",
    "label_steps",
    "load_source",
    "parse_problem",
    "read_math_files",
    "sample_problem",
    "split_steps",
    "step_positions",
    "token_step_labels",
]
