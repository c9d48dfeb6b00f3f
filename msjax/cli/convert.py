"""msjax-convert: Hugging Face folder <-> msjax checkpoint.

    msjax-convert import --hf HF_DIR --out CKPT_DIR [--dtype auto|float32|bfloat16]
    msjax-convert export --checkpoint CKPT_DIR --out HF_DIR [--dtype float32|bfloat16]
                         [--shard_size 2GB] [--step N]

import keeps the checkpoint's own dtype unless --dtype says otherwise; export writes float32
unless --dtype says otherwise. --shard-size is accepted as an alias of --shard_size.
"""

from __future__ import annotations

import logging

from absl import app, flags

from msjax import checkpoint
from msjax.cli import define_flag

HF = define_flag("string", "hf", None, "import: the Hugging Face model folder to read.")
OUT = define_flag("string", "out", None, "The directory to write.")
CHECKPOINT = define_flag("string", "checkpoint", None, "export: the msjax checkpoint to read.")
STEP = define_flag("integer", "step", None, "export: checkpoint step to export (default: latest).")
DTYPE = define_flag(
    "enum",
    "dtype",
    None,
    "Parameter dtype. Default: msjax-convert import keeps the checkpoint's own ('auto'), "
    "msjax-convert export and msjax-score use float32.",
    enum_values=["auto", "float32", "bfloat16"],
)
SHARD_SIZE = define_flag(
    "string", "shard_size", "2GB", "export: max bytes per safetensors file, e.g. 2GB, 500MB."
)
if "shard-size" not in flags.FLAGS:
    flags.DEFINE_alias("shard-size", "shard_size")

USAGE = (
    "usage: msjax-convert import --hf HF_DIR --out CKPT_DIR | "
    "msjax-convert export --checkpoint CKPT_DIR --out HF_DIR [--dtype float32|bfloat16] "
    "[--shard_size 2GB]"
)


def main(argv: list[str]) -> None:
    """argv: [program, "import" | "export"] (flags already parsed)."""
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        raise app.UsageError(USAGE)
    logging.getLogger().setLevel(logging.INFO)
    if argv[1] == "import":
        if not HF.value or not OUT.value:
            raise app.UsageError("import needs --hf and --out. " + USAGE)
        cfg = checkpoint.import_hf(HF.value, OUT.value, dtype=DTYPE.value or "auto")
        print(f"imported {HF.value} -> {OUT.value} ({cfg.num_params() / 1e6:.1f}M parameters)")
    else:
        if not CHECKPOINT.value or not OUT.value:
            raise app.UsageError("export needs --checkpoint and --out. " + USAGE)
        if DTYPE.value == "auto":
            raise app.UsageError("export --dtype must be float32 or bfloat16.")
        checkpoint.export_hf(
            CHECKPOINT.value,
            OUT.value,
            step=STEP.value,
            dtype=DTYPE.value or "float32",
            shard_size=SHARD_SIZE.value,
        )
        print(f"exported {CHECKPOINT.value} -> {OUT.value}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
