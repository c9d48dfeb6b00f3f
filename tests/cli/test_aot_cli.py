"""msjax-aot from the command line: exit status, table / JSON, "does not fit", bad topologies."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "experiments/configs/tiny.py")


def msjax_aot(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # cpu:N asks JAX itself
    return subprocess.run(
        [sys.executable, "-m", "msjax.cli.aot", "--config", TINY, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_tiny_on_eight_cpu_devices_fits_and_prints_json():
    # tiny micro-batches are 4 rows: 2 x 2 batch shards, 2-way tensor parallelism.
    out = msjax_aot(
        "--topology", "cpu:8", "--config.mesh.data=2", "--config.mesh.tensor=2", "--json"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert (report["fits"], report["devices"], report["topology"]) == (True, 8, "cpu:8")
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    programs = {p["name"]: p for p in report["programs"]}
    assert list(programs) == ["train_step", "ref_logprobs", "prefill", "decode"]
    for p in programs.values():
        assert 0 < p["total_bytes"] < report["hbm_bytes_per_device"]
        assert p["flops"] >= p["model_flops"] > 0
    assert report["rl_step_flops"] == sum(p["flops"] * p["calls"] for p in programs.values())
    assert report["mfu"] is None  # no --step_time, and no peak FLOP/s for a CPU


def test_an_oversized_model_does_not_fit_a_small_slice():
    # ~4.6 B parameters, f32 with two Adam moments: ~55 GB over 4 chips of 16 GiB.
    big = dict(hidden_size=8192, intermediate_size=32768, vocab_size=152064, num_heads=64)
    overrides = [f"--config.model.{k}={v}" for k, v in big.items()]
    out = msjax_aot("--topology", "v5litepod-4", "--programs", "train_step", *overrides)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "train_step does not fit on v5litepod-4 (v5e:2x2)" in out.stderr
    assert "does not fit" in out.stdout  # the table says so too


def test_bad_topology_names_the_accepted_forms():
    out = msjax_aot("--topology", "v5x-8")
    assert out.returncode == 2
    assert "Unknown topology 'v5x-8'" in out.stderr
    for form in ("v5p-64", "v5litepod-16", "v5p:2x4x4", "cpu:N"):
        assert form in out.stderr
