"""The tiny trainer as 2 processes on loopback (gloo) equals 1 process with the same 2 devices.

Process p of the 2-process run owns CPU device p; the single-process reference owns both. Both
sample in calls of 8 sequences (rollout.max_rows_per_call), so the multi-process path of chunked
rollouts is exercised too. In the 2-process run only process 1 gets SIGTERM, during RL step 2:
both processes must agree to stop after that step (else process 0 would wait forever in step 3's
collectives) with the checkpoint of step 2 written by both; started again, both restore it and
train step 3. All children share the test session's persistent compilation cache (set in
tests/conftest.py), so the restart and the second test's run compile (almost) nothing.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from msjax import checkpoint as ckpt
from msjax.metrics import read_metrics

CHILD = Path(__file__).with_name("trainer_child.py")
PHASE_TIMEOUT_S = 600  # generous: the CI machine may be shared
ROWS_PER_CALL = "8"  # tiny: 4 prompts x 4 samples = 16 rollouts -> 2 sampler calls
pytestmark = pytest.mark.expensive(minutes=3.5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    """This process's environment (with its compilation cache settings) for a child."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    for key in ("MSJAX_COORDINATOR_ADDRESS", "MSJAX_NUM_PROCESSES", "MSJAX_PROCESS_ID"):
        env.pop(key, None)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _start(workdir: Path, total: int, env: dict, log: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, str(CHILD), str(workdir), str(total), "--mesh", "1,2,1", *extra]
    with log.open("w") as f:
        return subprocess.Popen(
            [*args, "--rows_per_call", ROWS_PER_CALL],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
        )


def _distributed(workdir: Path, total: int, logs: Path, tag: str, *extra) -> list:
    """Starts the 2 processes of one multi-process run (1 CPU device each)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(2):
        env = _env(1)
        env.update(
            MSJAX_COORDINATOR_ADDRESS=address, MSJAX_NUM_PROCESSES="2", MSJAX_PROCESS_ID=str(pid)
        )
        procs.append(_start(workdir, total, env, logs / f"{tag}-p{pid}.log", *extra))
    return procs


def _wait(procs: list, logs: list[Path]) -> None:
    """Waits for all; on a failure, a hang or the deadline kills the rest and fails with logs."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.5)
    hung = [p for p in procs if p.poll() is None]
    for p in hung:
        p.kill()
        p.wait()
    bad = [i for i, p in enumerate(procs) if p in hung or p.returncode != 0]
    if bad:
        detail = "\n".join(
            f"--- {logs[i].name} (rc={procs[i].returncode}, hung={procs[i] in hung}):\n"
            + logs[i].read_text()[-3000:]
            for i in bad
        )
        raise AssertionError(f"trainer children failed:\n{detail}")


def _params(workdir: Path, step: int) -> list[np.ndarray]:
    model, _ = ckpt.load_model(workdir, step=step)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]


def test_two_processes_train_and_resume_like_one(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    single, multi = tmp_path / "single", tmp_path / "multi"
    # Phase 1: the reference (3 RL steps) and, side by side, the 2-process run, stopped by a
    # SIGTERM that only process 1 receives (during step 2).
    ref = _start(single, 3, _env(2), logs / "single.log")
    term = ("--signal", "TERM", "--at", "2", "--signal_process", "1")
    procs = _distributed(multi, 3, logs, "run1", *term)
    _wait([ref, *procs], [logs / "single.log", logs / "run1-p0.log", logs / "run1-p1.log"])
    assert ckpt.latest_step(multi) == 2
    for pid in range(2):
        assert "steps [2]" in (logs / f"run1-p{pid}.log").read_text()
    # Phase 2: both processes restore step 2 and train step 3.
    procs = _distributed(multi, 3, logs, "run2")
    _wait(procs, [logs / "run2-p0.log", logs / "run2-p1.log"])

    for step in (2, 3):
        for a, b in zip(_params(single, step), _params(multi, step), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Metrics come from process 0 only: one row per step across both starts.
    assert [r["step"] for r in read_metrics(multi)] == [1, 2, 3]
    single_rows = {r["step"]: r for r in read_metrics(single)}
    for row in read_metrics(multi):
        assert row["reward"] == single_rows[row["step"]]["reward"]
    # Logs too: the resume message appears in process 0's output only.
    assert "Resumed" in (logs / "run2-p0.log").read_text()
    assert "Resumed" not in (logs / "run2-p1.log").read_text()


def _rewards_printed(log: Path) -> dict[int, str]:
    return {
        int(line.split()[1]): line.split()[2]
        for line in log.read_text().splitlines()
        if line.startswith("rewards ")
    }


def test_a_reward_timeout_on_one_process_does_not_split_the_rewards(tmp_path):
    """Step 1: process 1's verifier times out on an item (it scores 0 there, not on process 0);
    both processes still train on the same rewards, since each row is verified by one process
    and the verdicts are gathered. Step 2: process 1's gathered rewards differ anyway (corrupted
    here): the run stops on every process with RewardMismatchError before training on them."""
    logs = tmp_path / "logs"
    logs.mkdir()
    flags = ("--reward_timeout_process", "1", "--corrupt_rewards_process", "1", "--at", "2")
    procs = _distributed(tmp_path / "run", 2, logs, "run", *flags)
    deadline = time.monotonic() + 2 * PHASE_TIMEOUT_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:  # hung: fail below with its log
            p.kill()
            p.wait()

    texts = [(logs / f"run-p{pid}.log").read_text() for pid in range(2)]
    seen = [_rewards_printed(logs / f"run-p{pid}.log") for pid in range(2)]
    assert seen[0][1] == seen[1][1], texts[1][-2000:]
    rewards = [float(r) for r in seen[0][1].split(",")]
    assert 0 < sum(rewards) < len(rewards)  # the stand-in reward gives both verdicts
    for p, text in zip(procs, texts, strict=True):
        assert p.returncode not in (0, None) and "RewardMismatchError" in text, text[-2000:]
        assert "RL step 2: the rewards or rollout texts of process(es) [1] differ" in text
    assert ckpt.latest_step(tmp_path / "run") is None
