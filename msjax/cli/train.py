"""msjax-train: GRPO + SPR training from an ml_collections recipe.

    msjax-train --config experiments/configs/tiny.py --config.workdir=DIR \
        [--config.total_steps=N] [--config.<any.field>=VALUE ...]

The run resumes from the latest checkpoint in its workdir by itself; raising total_steps on a
finished workdir continues it. SIGTERM saves the current step and exits cleanly. Export a run
with `msjax-convert export --checkpoint DIR --out HF_DIR`.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (get_config()).")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from msjax import distributed

    distributed.initialize()
    distributed.log_from_main_process_only()
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from msjax.rl.trainer import Trainer

    trainer = Trainer(_CONFIG.value)
    try:
        metrics = trainer.run()
    finally:
        trainer.close()
    if metrics and distributed.is_main_process():
        keys = ("reward", "spr_loss", "spr_kept_frac", "rollout_score_gap", "pg_loss", "kl")
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
        logging.info("Finished at RL step %d: %s", trainer.rl_step, summary)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
