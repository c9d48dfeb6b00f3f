"""Runs the tiny trainer in a child process; optionally signals itself during an RL step.

    python trainer_child.py WORKDIR TOTAL_STEPS [--signal KILL|TERM --at STEP] [--mesh d,f,t]
        [--rows_per_call R] [--signal_process P]
        [--reward_timeout_process P] [--corrupt_rewards_process P]

Used by test_trainer.py to test exact resume after SIGKILL and a clean stop on SIGTERM, and by
test_trainer_distributed.py as one process of a multi-process run (MSJAX_* variables set).
--reward_timeout_process P replaces the outcome reward by a deterministic stand-in (1 for a
response of even length) whose first reward-1 item "times out" (scores 0) on process P only;
--corrupt_rewards_process P changes one gathered reward on process P during RL step --at. Every
process prints the
rewards of each step ("rewards STEP r0,r1,...").
"""

import argparse
import logging
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs.tiny import get_config  # noqa: E402
from msjax import distributed  # noqa: E402
from msjax.rl.trainer import Trainer  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("total_steps", type=int)
    p.add_argument("--signal", choices=["KILL", "TERM"])
    p.add_argument("--at", type=int, default=-1)
    p.add_argument("--mesh", default="1,-1,1")
    p.add_argument("--rows_per_call", type=int, default=0)
    p.add_argument("--signal_process", type=int, default=-1, help="only this process signals")
    p.add_argument("--reward_timeout_process", type=int, default=-1)
    p.add_argument("--corrupt_rewards_process", type=int, default=-1)
    a = p.parse_args()
    distributed.initialize(timeout_s=120)  # multi-process when the MSJAX_* variables are set
    logging.basicConfig()  # a stderr handler unless one is already installed
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    distributed.log_from_main_process_only()
    c = get_config()
    c.workdir, c.total_steps, c.log.progress = a.workdir, a.total_steps, False
    c.rollout.max_rows_per_call = a.rows_per_call
    c.mesh.update(dict(zip(("data", "fsdp", "tensor"), map(int, a.mesh.split(",")))))
    trainer = Trainer(c)
    if a.signal and a.signal_process in (-1, jax.process_index()):
        update = trainer._update

        def update_then_signal(tb):
            out = update(tb)
            if trainer.rl_step + 1 == a.at:  # during RL step `at` (1-based), after its update
                trainer.manager.wait_until_finished()  # the earlier (async) checkpoint has landed
                os.kill(os.getpid(), getattr(signal, f"SIG{a.signal}"))
            return out

        trainer._update = update_then_signal
    _patch_rewards(trainer, a)
    trainer.run()
    trainer.close()
    print("steps", trainer.manager.all_steps(), flush=True)


def _patch_rewards(trainer, a) -> None:
    me = jax.process_index()
    if a.reward_timeout_process >= 0:

        def verify(prompts, responses, golds):
            rewards = np.asarray([len(r) % 2 == 0 for r in responses], np.float32)
            if me == a.reward_timeout_process and rewards.any():
                rewards[np.argmax(rewards)] = 0.0  # this item timed out here
            return rewards

        trainer._verify = verify
    if a.corrupt_rewards_process == me:
        gather = trainer._gather_rows

        def corrupted(local):
            out = np.array(gather(local))
            if trainer.rl_step + 1 == a.at:
                out[0] += 1.0
            return out

        trainer._gather_rows = corrupted
    rewards = trainer._rewards

    def logged(*args):
        out = rewards(*args)
        print("rewards", trainer.rl_step + 1, ",".join(f"{r:g}" for r in out), flush=True)
        return out

    trainer._rewards = logged


if __name__ == "__main__":
    main()
