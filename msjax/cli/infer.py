"""msjax-infer: test-time scaling (Best-of-N by SPRM score, votes, early pruning) over a JSONL file.

    msjax-infer --model DIR --input IN.jsonl --output OUT.jsonl [--mode low|medium|high | --k N]
        [--temperature T] [--top_p P] [--top_k K] [--max_new_tokens N] [--seed S]
        [--prune RULE] [--batch_size B] [--template r1|plain] [--selection bon|majority|weighted]
        [--dtype float32|bfloat16|auto] [--mesh D,F,T]

The hyphenated spellings (--top-p, --top-k, --max-new-tokens, --batch-size) are aliases.
DIR is a Hugging Face folder (with score_module.pt) or an msjax checkpoint, with tokenizer files.
Modes: low = 2, medium = 8, high = 32 candidates; neither --mode nor --k: one candidate.
`--temperature 0 --k 1` is greedy decoding. RULE is e.g. "margin=0.2,every=64" or
"keep=0.5,every=128,min_steps=2" (see msjax.generate.pruning). Rows and outputs: see
msjax.generate.infer. With gold answers a table of pass@1, maj@k, BoN@k is printed at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path

from absl import app, flags

from msjax import checkpoint
from msjax.cli import define_flag
from msjax.generate.infer import InferOptions, infer_file, summary_table
from msjax.generate.pruning import PruneRule
from msjax.generate.tts import MODES, SELECTIONS, resolve_k
from msjax.sharding import DECODE_RULES
from msjax.tokenizer import TEMPLATES, Tokenizer

MODEL = define_flag("string", "model", None, "A Hugging Face folder or an msjax checkpoint.")
INPUT = define_flag("string", "input", None, "Input JSONL file.")
OUTPUT = define_flag("string", "output", None, "Output JSONL file.")
MODE = define_flag("enum", "mode", None, "Reasoning effort (Best-of-k).", enum_values=list(MODES))
K = define_flag("integer", "k", None, "Candidates per prompt (instead of --mode).")
TEMPERATURE = define_flag("float", "temperature", 0.6, "Sampling temperature; 0 = greedy.")
TOP_P = define_flag("float", "top_p", 0.95, "Nucleus sampling mass in (0, 1].")
TOP_K = define_flag("integer", "top_k", 0, "Keep the k most likely tokens (0 = off).")
MAX_NEW = define_flag("integer", "max_new_tokens", 1024, "Generated tokens per candidate.")
SEED = define_flag("integer", "seed", 0, "Sampling seed.")
PRUNE = define_flag("string", "prune", None, "Early pruning rule, e.g. 'margin=0.2,every=64'.")
BATCH_SIZE = define_flag("integer", "batch_size", 8, "Prompts per sampler call.")
TEMPLATE = define_flag(
    "enum", "template", "r1", "Template for 'problem' rows.", enum_values=list(TEMPLATES)
)
SELECTION = define_flag(
    "enum", "selection", "bon", "How to choose among candidates.", enum_values=list(SELECTIONS)
)
DTYPE = define_flag(
    "enum",
    "dtype",
    None,
    "Parameter dtype (default float32).",
    enum_values=["auto", "float32", "bfloat16"],
)
MESH = define_flag("string", "mesh", None, "Mesh sizes 'data,fsdp,tensor' (default: no mesh).")
for _alias, _name in (
    ("top-p", "top_p"),
    ("top-k", "top_k"),
    ("max-new-tokens", "max_new_tokens"),
    ("batch-size", "batch_size"),
):
    if _alias not in flags.FLAGS:
        flags.DEFINE_alias(_alias, _name)


def options_from_flags() -> InferOptions:
    """InferOptions from the flags; app.UsageError naming the flag for a bad value."""
    try:
        k = 1 if MODE.value is None and K.value is None else resolve_k(MODE.value, K.value)
        prune = PruneRule.parse(PRUNE.value) if PRUNE.value else None
        return InferOptions(
            k=k,
            temperature=TEMPERATURE.value,
            top_p=TOP_P.value,
            top_k=TOP_K.value,
            max_new_tokens=MAX_NEW.value,
            seed=SEED.value,
            prune=prune,
            batch_size=BATCH_SIZE.value,
            template=TEMPLATE.value,
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
    tokenizer = Tokenizer.from_dir(tok_dir)
    mesh = _mesh()
    # Weights in the decode layout (msjax.sharding.DECODE_RULES): no per-token gathers.
    model, cfg = checkpoint.load_any(
        MODEL.value, mesh, dtype=DTYPE.value or "float32", rules=DECODE_RULES
    )
    try:
        summary = infer_file(model, cfg, tokenizer, INPUT.value, OUTPUT.value, options, mesh=mesh)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    print(summary_table(summary))
    print(f"-> {OUTPUT.value}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
