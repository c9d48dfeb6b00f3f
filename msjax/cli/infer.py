"""msjax-infer: test-time scaling (Best-of-N by SPRM score, votes, early pruning) over a data file.

    msjax-infer --model DIR --input IN.jsonl|.parquet|.json --output OUT.jsonl
        [--preset official] [--mode low|medium|high | --k N] [--temperature T] [--top_p P]
        [--top_k K] [--repetition_penalty R] [--max_new_tokens N] [--seed S] [--prune RULE]
        [--batch_size B] [--template chat|none|r1|plain] [--suffix TEXT]
        [--selection bon|majority|weighted] [--reward math|official] [--manager naive|prime]
        [--allow_untrained_head] [--lang en|zh] [--dtype float32|bfloat16|auto] [--mesh D,F,T]
    msjax-infer --pool OUT1.jsonl,OUT2.jsonl,...

The hyphenated spellings (--top-p, --top-k, --max-new-tokens, --batch-size) are aliases.
DIR is a Hugging Face folder (with score_module.pt) or an msjax checkpoint, with tokenizer files;
a model without a trained SPRM head is refused unless --allow_untrained_head.
The input is any file msjax.data.local_math reads (the original AIME JSONL, verl parquet, C-Eval
JSON, {problem, answer} rows); prompts are rendered with --template (default: the checkpoint's
chat template when it has one, else "none" for prompt rows and "r1" for problems).
`--preset official` sets the original's test-time settings (k 16, temperature 0.6, top_p 0.95,
repetition penalty 1.05, up to 32768 new tokens clamped to the model's context, the official
reward); flags given explicitly override it.
Modes: low = 2, medium = 8, high = 32 candidates; neither --mode nor --k: one candidate.
`--temperature 0 --k 1` is greedy decoding. RULE is e.g. "margin=0.2,every=64" or
"keep=0.5,every=128,min_steps=2" (see msjax.generate.pruning). Rows and outputs: see
msjax.generate.infer. With gold answers a table of pass@1, maj@k, BoN@k and BoN over disjoint
groups of 2 / 8 / 32 is printed; `--pool` prints the latter for candidates pooled over the output
files of several runs (the original's metric).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import app, flags

from msjax import checkpoint
from msjax.cli import (
    define_decoding_flags,
    define_flag,
    define_head_flags,
    define_placement_flags,
    options_over_preset,
)
from msjax.generate.infer import InferOptions, infer_file, pool_files, summary_table
from msjax.generate.pruning import PruneRule
from msjax.generate.tts import MODES, SELECTIONS, resolve_k
from msjax.sharding import DECODE_RULES
from msjax.tokenizer import LANG_STEP_MODES, Tokenizer

MODEL = define_flag("string", "model", None, "A Hugging Face folder or an msjax checkpoint.")
INPUT = define_flag("string", "input", None, "Input .jsonl / .parquet / .json file.")
OUTPUT = define_flag("string", "output", None, "Output JSONL file.")
MODE = define_flag("enum", "mode", None, "Reasoning effort (Best-of-k).", enum_values=list(MODES))
K = define_flag("integer", "k", None, "Candidates per prompt (instead of --mode).")
DECODING = define_decoding_flags()
TOP_K = define_flag("integer", "top_k", 0, "Keep the k most likely tokens (0 = off).")
SEED = define_flag("integer", "seed", 0, "Sampling seed.")
PRUNE = define_flag("string", "prune", None, "Early pruning rule, e.g. 'margin=0.2,every=64'.")
BATCH_SIZE = define_flag("integer", "batch_size", 8, "Prompts per sampler call.")
LANG, ALLOW_UNTRAINED = define_head_flags()
POOL = define_flag(
    "string", "pool", None, "Comma-separated msjax-infer outputs: print the pooled metric only."
)
SELECTION = define_flag(
    "enum", "selection", "bon", "How to choose among candidates.", enum_values=list(SELECTIONS)
)
DTYPE, MESH = define_placement_flags()
for _alias, _name in (
    ("top-p", "top_p"),
    ("top-k", "top_k"),
    ("max-new-tokens", "max_new_tokens"),
    ("batch-size", "batch_size"),
):
    if _alias not in flags.FLAGS:
        flags.DEFINE_alias(_alias, _name)


def options_from_flags() -> InferOptions:
    """InferOptions from the flags (over the preset's values, when --preset is given: flags given
    explicitly win); app.UsageError naming the flag for a bad value."""
    try:
        values = options_over_preset({**DECODING, "top_k": TOP_K})
        if MODE.value is not None or K.value is not None:
            values["k"] = resolve_k(MODE.value, K.value)
        elif DECODING["preset"].value is None:
            values["k"] = 1
        return InferOptions(
            **values,
            seed=SEED.value,
            prune=PruneRule.parse(PRUNE.value) if PRUNE.value else None,
            batch_size=BATCH_SIZE.value,
            selection=SELECTION.value,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def _mesh():
    if not MESH.value:
        return None
    from msjax.sharding import make_mesh

    try:
        return make_mesh([int(x) for x in MESH.value.split(",")])
    except ValueError as e:
        raise app.UsageError(f"--mesh={MESH.value!r}: {e}") from e


def main(argv: list[str]) -> None:
    """argv: [program] (flags already parsed)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if POOL.value:
        try:
            print(summary_table(pool_files([p for p in POOL.value.split(",") if p])))
        except (OSError, ValueError) as e:
            raise app.UsageError(f"--pool: {e}") from e
        return
    for holder in (MODEL, INPUT, OUTPUT):
        if not holder.value:
            raise app.UsageError(f"--{holder.name} is required.")
    options = options_from_flags()
    if not Path(INPUT.value).is_file():
        raise app.UsageError(f"--input {INPUT.value} does not exist.")
    logging.getLogger().setLevel(logging.INFO)
    tok_dir = checkpoint.tokenizer_dir(MODEL.value)
    if tok_dir is None:
        raise app.UsageError(f"{MODEL.value} has no tokenizer.json (needed to encode prompts).")
    try:
        checkpoint.require_trained_head(MODEL.value, ALLOW_UNTRAINED.value)
        tokenizer = Tokenizer.from_dir(tok_dir, step_mode=LANG_STEP_MODES[LANG.value])
        mesh = _mesh()
        # Weights in the decode layout (msjax.sharding.DECODE_RULES): no per-token gathers.
        model, cfg = checkpoint.load_any(
            MODEL.value, mesh, dtype=DTYPE.value or "float32", rules=DECODE_RULES
        )
        summary = infer_file(
            model,
            cfg,
            tokenizer,
            INPUT.value,
            OUTPUT.value,
            options,
            mesh=mesh,
            progress=sys.stderr.isatty(),
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    print(summary_table(summary))
    print(f"-> {OUTPUT.value}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
