"""The RL trainer end to end on the tiny recipe: exact resume, SIGKILL/SIGTERM, mesh change, CLI."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from msjax import checkpoint as ckpt
from msjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("trainer_child.py")
pytestmark = pytest.mark.expensive(minutes=4)


def child_env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_child(workdir, total, *extra, devices=1, expect_rc=0):
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(workdir), str(total), *extra],
        env=child_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    return proc


def saved_params(workdir, step):
    with ocp.CheckpointManager(ckpt.checkpoints_path(workdir)) as m:
        return m.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]


def saved_meta(workdir, step):
    with ocp.CheckpointManager(ckpt.checkpoints_path(workdir)) as m:
        return m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """4 RL steps in one process (checkpoints at 2 and 4)."""
    wd = tmp_path_factory.mktemp("straight")
    run_child(wd, 4)
    return wd


def test_sigkill_then_resume_is_bit_identical(straight_run, tmp_path):
    run_child(tmp_path, 4, "--signal", "KILL", "--at", "3", expect_rc=-signal.SIGKILL)
    assert ckpt.latest_step(tmp_path) == 2  # step 3 never completed
    run_child(tmp_path, 4)
    a, b = saved_params(straight_run, 4), saved_params(tmp_path, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert saved_meta(straight_run, 4)["data_state"] == saved_meta(tmp_path, 4)["data_state"]
    # the resumed run's log continues the same metrics file: steps 1-2, then 3-4 (3 twice is not
    # possible because step 3 was killed before it was logged)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_sigterm_saves_the_step_it_was_on(tmp_path):
    out = run_child(tmp_path, 6, "--signal", "TERM", "--at", "3")
    assert ckpt.latest_step(tmp_path) == 3
    assert "steps [2, 3]" in out.stdout


def test_raising_total_steps_continues_a_finished_run(straight_run, tmp_path):
    run_child(tmp_path, 2)
    run_child(tmp_path, 4)
    a, b = saved_params(straight_run, 4), saved_params(tmp_path, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_onto_a_different_mesh(straight_run, tmp_path):
    run_child(tmp_path, 2, "--mesh", "1,2,2", devices=4)
    run_child(tmp_path, 4, "--mesh", "2,1,1", devices=2)
    a, b = saved_params(straight_run, 4), saved_params(tmp_path, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_msjax_train_cli_logs_reward_and_spr_metrics(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "msjax.cli.train",
        "--config",
        str(ROOT / "experiments/configs/tiny.py"),
        f"--config.workdir={tmp_path}",
        "--config.total_steps=2",
        "--config.log.progress=False",
    ]
    proc = subprocess.run(
        cmd, env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "spr_loss", "spr_kept_frac", "rollout_score_gap", "pg_loss", "kl"):
        assert all(key in r for r in rows), key
    assert ckpt.latest_step(tmp_path) == 2
    assert (tmp_path / "tensorboard").is_dir()
