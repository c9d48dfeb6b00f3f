"""msjax-aot: will a training recipe fit a topology? Compile it ahead of time and find out.

    msjax-aot --config experiments/configs/metastone_1p5b.py --topology v5p-16 \
        [--config.<field>=VALUE ...] [--json] [--step_time SECONDS] [--programs train_step,decode]
        [--sampler_layout decode|train]

Compiles the real train step, reference forward and sampler prefill/decode of the recipe for a
TPU topology (v4-32, v5e-16 / v5litepod-16, v5p-64, v6e-8, v5p:2x4x4, ...; libtpu compiles on a
CPU host, no TPU needed) or for N CPU devices of this host (cpu:N), from abstract state: nothing
is allocated. Prints per-device memory (arguments, outputs, temporaries, resident state) against
the chip's HBM, FLOPs per call and per RL step, with --step_time the MFU of the train step, and
for the decode loop the bytes moved between chips and read from HBM per generated token, with
the roofline tokens/s per chip (--sampler_layout train: the sampler on the training parameters).
Exit status: 0 when every program fits, 1 when one does not ("does not fit" names it and the
numbers), 2 for a bad topology, program or config. See msjax.aot for what is counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from msjax.cli import define_flag

if "config" in flags.FLAGS:  # another CLI module of this process defined it
    _CONFIG = flags.FlagHolder(flags.FLAGS, flags.FLAGS["config"])
else:
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (get_config()).")
TOPOLOGY = define_flag(
    "string", "topology", None, "v5p-64, v5e-16, v5litepod-16, v6e-8, v4-32, v5p:2x4x4, cpu:8..."
)
JSON = define_flag("bool", "json", False, "Print one JSON object instead of the table.")
STEP_TIME = define_flag(
    "float", "step_time", None, "Seconds per train step (one mini-batch update): prints the MFU."
)
PROGRAMS = define_flag(
    "list",
    "programs",
    ["train_step", "ref_logprobs", "prefill", "decode"],
    "Programs to compile (train_step, ref_logprobs, prefill, decode).",
)
SAMPLER_LAYOUT = define_flag(
    "enum",
    "sampler_layout",
    "decode",
    "Weights the sampler runs on: decode (the rollout engine's copy, as the trainer runs it) or "
    "train (the training parameters and their FSDP shardings, for comparison).",
    enum_values=["decode", "train"],
)


def _use_cpu_devices(topology: str) -> None:
    """Compile on this host's CPU; for cpu:N ask JAX for N CPU devices (only possible before
    JAX starts; msjax.topology names the fix otherwise)."""
    import jax

    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    name = topology.strip().lower()
    if name.startswith("cpu:") and name[4:].isdigit():
        with contextlib.suppress(RuntimeError):  # JAX already started: devices() explains
            jax.config.update("jax_num_cpu_devices", int(name[4:]))


def main(argv: list[str]) -> int:
    """argv: [program] (flags already parsed). Returns the exit status."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or not TOPOLOGY.value:
        raise app.UsageError("--config and --topology are required.")
    _use_cpu_devices(TOPOLOGY.value)
    from msjax.aot import plan

    name = os.path.basename(flags.FLAGS["config"].config_filename or "config")
    try:
        report = plan(
            _CONFIG.value,
            TOPOLOGY.value,
            programs=tuple(PROGRAMS.value),
            step_time=STEP_TIME.value,
            config_name=name,
            sampler_layout=SAMPLER_LAYOUT.value,
        )
    except ValueError as e:
        print(f"msjax-aot: error: {e}", file=sys.stderr)
        return 2
    if JSON.value:
        print(json.dumps(report.to_dict()))
    else:
        print(report.format())
    if not report.fits():
        for line in report.problems():
            print(f"msjax-aot: {line}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
