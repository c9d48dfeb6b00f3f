"""msjax-score: SPRM scores of whole texts, the service of the original reward server's /score.

    msjax-score --model DIR --input IN.jsonl --output OUT.jsonl [--batch_size 8] [--dtype float32]
        [--allow_untrained_head] [--lang en|zh]

DIR is a Hugging Face folder (with score_module.pt) or an msjax checkpoint; it must carry
tokenizer files. A model without a trained SPRM head (no score_module.pt, or imported from a
folder without one) is refused unless --allow_untrained_head. Input rows: {"text": ...} or
{"prompt": ..., "response": ...}. Output rows, one per non-blank input line: {"value",
"step_scores", "step_positions"}; a malformed row (bad JSON, not UTF-8, missing fields) gives
nulls and an "error" message (see msjax.scoring.score_file).
"""

from __future__ import annotations

import logging

from absl import app

from msjax import checkpoint
from msjax.cli import define_flag, define_head_flags
from msjax.scoring import score_file
from msjax.tokenizer import LANG_STEP_MODES, Tokenizer

MODEL = define_flag("string", "model", None, "A Hugging Face folder or an msjax checkpoint.")
INPUT = define_flag("string", "input", None, "score: input JSONL file.")
OUTPUT = define_flag("string", "output", None, "score: output JSONL file.")
BATCH_SIZE = define_flag("integer", "batch_size", 8, "Rows per forward pass.")
LANG, ALLOW_UNTRAINED = define_head_flags()
DTYPE = define_flag(
    "enum",
    "dtype",
    None,
    "Parameter dtype. Default: msjax-convert import keeps the checkpoint's own ('auto'), "
    "msjax-convert export and msjax-score use float32.",
    enum_values=["auto", "float32", "bfloat16"],
)


def main(argv: list[str]) -> None:
    """argv: [program] (flags already parsed)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for holder in (MODEL, INPUT, OUTPUT):
        if not holder.value:
            raise app.UsageError(f"--{holder.name} is required.")
    logging.getLogger().setLevel(logging.INFO)
    tok_dir = checkpoint.tokenizer_dir(MODEL.value)
    if tok_dir is None:
        raise app.UsageError(f"{MODEL.value} has no tokenizer.json (needed to find the steps).")
    try:
        checkpoint.require_trained_head(MODEL.value, ALLOW_UNTRAINED.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    tokenizer = Tokenizer.from_dir(tok_dir, step_mode=LANG_STEP_MODES[LANG.value])
    model, _ = checkpoint.load_any(MODEL.value, dtype=DTYPE.value or "float32")
    counts = score_file(model, tokenizer, INPUT.value, OUTPUT.value, BATCH_SIZE.value)
    print(
        f"scored {counts['scored']} of {counts['rows']} rows ({counts['skipped']} malformed "
        f"rows skipped) -> {OUTPUT.value}"
    )


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
