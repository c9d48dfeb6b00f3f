"""msjax.distributed: settings resolution, single-process behaviour, a 2-process loopback run."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from msjax import distributed

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
import distributed_child  # noqa: E402

CHILD_TIMEOUT_S = 150
ENV_KEYS = (
    distributed.ENV_COORDINATOR,
    distributed.ENV_NUM_PROCESSES,
    distributed.ENV_PROCESS_ID,
    distributed.JAX_ENV_COORDINATOR,
)


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


# ---- settings resolution (pure) ----


def test_nothing_set_means_single_process():
    assert distributed.resolve_process_spec(environ={}) is None


def test_env_vars_resolve():
    env = {"MSJAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "MSJAX_NUM_PROCESSES": "4"}
    env["MSJAX_PROCESS_ID"] = "3"
    assert distributed.resolve_process_spec(environ=env) == distributed.ProcessSpec(
        "10.0.0.2:8476", 4, 3
    )


def test_arguments_override_env_and_jax_address_is_accepted():
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "MSJAX_NUM_PROCESSES": "8"}
    env["MSJAX_PROCESS_ID"] = "5"
    spec = distributed.resolve_process_spec(num_processes=2, process_id=1, environ=env)
    assert spec == distributed.ProcessSpec("h0:1234", 2, 1)
    env["MSJAX_COORDINATOR_ADDRESS"] = "h1:99"
    assert distributed.resolve_process_spec(environ=env).coordinator_address == "h1:99"


def _full(address: str, count: str, index: str) -> dict[str, str]:
    return {
        "MSJAX_COORDINATOR_ADDRESS": address,
        "MSJAX_NUM_PROCESSES": count,
        "MSJAX_PROCESS_ID": index,
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MSJAX_NUM_PROCESSES": "2"}, "MSJAX_COORDINATOR_ADDRESS, MSJAX_PROCESS_ID not"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "MSJAX_PROCESS_ID": "0"}, "MSJAX_NUM_PROCESSES not"),
        (_full("h", "2", "0"), "is not 'host:port'"),
        (
            {"MSJAX_COORDINATOR_ADDRESS": "h:1", "MSJAX_NUM_PROCESSES": "two"},
            "MSJAX_PROCESS_ID not",
        ),
        (_full("h:1", "two", "0"), "MSJAX_NUM_PROCESSES='two' is not an integer"),
        (_full("h:1", "2", "2"), "0 <= MSJAX_PROCESS_ID < MSJAX_NUM_PROCESSES"),
    ],
)
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        distributed.resolve_process_spec(environ=env)


def test_cloud_tpu_detection_respects_platforms():
    assert distributed.on_cloud_tpu({"JAX_PLATFORMS": "tpu", "TPU_WORKER_HOSTNAMES": "a,b"})
    assert not distributed.on_cloud_tpu({"JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "a,b"})


# ---- single process (this pytest process: 8 CPU devices, no coordinator) ----


def test_initialize_is_a_noop_for_one_process(clean_env):
    distributed.initialize()
    distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=1, process_id=0)
    assert not jax.distributed.is_initialized()
    assert (distributed.process_index(), distributed.process_count()) == (0, 1)
    assert distributed.is_main_process()
    distributed.sync("single-process")  # returns at once


def test_initialize_rejects_partial_settings(clean_env, monkeypatch):
    monkeypatch.setenv("MSJAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="MSJAX_COORDINATOR_ADDRESS, MSJAX_NUM_PROCESSES not"):
        distributed.initialize()


def test_main_process_helpers_in_single_process(caplog):
    assert distributed.main_process_only(lambda a, b: a + b)(2, b=3) == 5
    logger = logging.getLogger("msjax.test_distributed")
    distributed.log_from_main_process_only(logger)
    distributed.log_from_main_process_only(logger)
    assert sum(isinstance(f, distributed.MainProcessFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("kept")
    assert "kept" in caplog.text


def test_make_global_batch_single_process():
    mesh = jax.make_mesh((4, 2), ("data", "tensor"))
    local = {"tokens": np.arange(24, dtype=np.int32).reshape(8, 3), "mask": np.ones(8, bool)}
    out = distributed.make_global_batch(local, NamedSharding(mesh, P("data", None)))
    np.testing.assert_array_equal(np.asarray(out["tokens"]), local["tokens"])
    np.testing.assert_array_equal(np.asarray(out["mask"]), local["mask"])
    assert out["tokens"].sharding.spec == P("data") and out["mask"].sharding.spec == P("data")
    assert out["tokens"].addressable_shards[0].data.shape == (2, 3)
    assert out["mask"].addressable_shards[0].data.shape == (2,)


def test_make_global_batch_rejects_bad_batches():
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    with pytest.raises(ValueError, match="one shared leading batch size"):
        distributed.make_global_batch({"a": np.zeros((8, 2)), "b": np.zeros((16,))}, sharding)
    with pytest.raises(ValueError, match="empty batch"):
        distributed.make_global_batch({}, sharding)
    with pytest.raises(ValueError, match="evenly divide"):
        distributed.make_global_batch(np.zeros((6, 2)), sharding)


# ---- two processes on loopback ----


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_children(tmp_path: Path, num_processes: int, devices_per_process: int) -> list[dict]:
    """Start the child script `num_processes` times; return each one's RESULT dict (+ stderr)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        MSJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
        MSJAX_NUM_PROCESSES=str(num_processes),
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR.parent), env.get("PYTHONPATH", "")]),
    )
    procs = []
    for pid in range(num_processes):
        out, err = tmp_path / f"child{pid}.out", tmp_path / f"child{pid}.err"
        with out.open("w") as fo, err.open("w") as fe:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(TESTS_DIR / "distributed_child.py")],
                    env={**env, "MSJAX_PROCESS_ID": str(pid)},
                    stdout=fo,
                    stderr=fe,
                    cwd=tmp_path,
                )
            )
    # Poll all children: stop at the deadline, or as soon as one fails (the others would hang).
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.2)
    hung = [p for p in procs if p.poll() is None]
    for proc in hung:
        proc.kill()
        proc.wait()
    logs = [
        ((tmp_path / f"child{i}.out").read_text(), (tmp_path / f"child{i}.err").read_text())
        for i in range(num_processes)
    ]
    failed = [i for i, p in enumerate(procs) if p in hung or p.returncode != 0]
    if failed:
        detail = "\n".join(
            f"--- child {i} (rc={procs[i].returncode}, hung={procs[i] in hung}) stderr tail:\n"
            + logs[i][1][-3000:]
            for i in failed
        )
        pytest.fail(f"child processes {failed} failed:\n{detail}")
    results = []
    for out, err in logs:
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert len(lines) == 1, f"no RESULT line in child output:\n{out}\n{err[-2000:]}"
        results.append({**json.loads(lines[0][len("RESULT ") :]), "stderr": err})
    return results


def test_two_processes_match_numpy_reference(tmp_path):
    num_processes, local = 2, 2
    results = _run_children(tmp_path, num_processes, local)

    rows = num_processes * local * distributed_child.ROWS_PER_DEVICE
    x, y, w = (a.astype(np.float64) for a in distributed_child.problem(rows))
    h = np.tanh(x @ w)
    loss = np.mean((h - y) ** 2)
    grad = x.T @ (2.0 * (h - y) * (1.0 - h**2)) / h.size
    weights = np.arange(1, rows + 1, dtype=np.float64)
    weighted_mean = np.sum(weights[:, None] * x) / np.sum(weights)

    for i, r in enumerate(results):
        assert r["process_index"] == i and r["process_count"] == num_processes
        assert (r["device_count"], r["local_device_count"]) == (num_processes * local, local)
        assert r["is_main"] == (i == 0) and r["main_only"] == ("main" if i == 0 else None)
        assert r["global_batch_shape"] == [rows, distributed_child.FEATURES]
        # Process p's rows sit p-th in the global batch, which is the full reference input.
        np.testing.assert_allclose(r["x"], x, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(r["h"], h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(r["grad"], grad, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r["weighted_mean"], weighted_mean, rtol=1e-5)
    assert "LOG-LINE from process 0" in results[0]["stderr"]
    assert "LOG-LINE" not in results[1]["stderr"]
