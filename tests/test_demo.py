"""The whole demo pipeline on the micro recipe: report keys and ranges, plots, HF parity, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KS = ("2", "8", "32")


def run_demo(out_dir, *extra, expect_rc=0):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        "-m",
        "experiments.demo",
        f"--config={ROOT / 'experiments/configs/demo.py'}:micro",
        f"--config.out_dir={out_dir}",
        "--config.log.progress=False",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect_rc, proc.stderr[-4000:]
    return proc.stderr


def _fraction(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    first = run_demo(out, "--config.stop_after=rl")
    stopped = sorted(p.stem for p in (out / "stages").glob("*.json"))
    second = run_demo(out)
    return out, first, stopped, second


def test_report_has_every_key_with_sane_values(demo_runs):
    out = demo_runs[0]
    report = json.loads((out / "report.json").read_text())
    for key in ("pass1_before_rl", "pass1_after_rl", "prune_token_savings"):
        assert _fraction(report[key]), (key, report[key])
    for name in ("bon", "maj", "random"):
        assert sorted(report[name]) == sorted(KS), name
        assert all(_fraction(v) for v in report[name].values()), (name, report[name])
    # AUROC is null only when a class (correct / wrong) is missing in this tiny run
    for key in ("traj_auroc", "step_auroc"):
        assert report[key] is None or _fraction(report[key]), (key, report[key])
    assert isinstance(report["prune_accuracy_change"], float)
    assert -1.0 <= report["prune_accuracy_change"] <= 1.0
    assert report["hf_greedy_parity"] is True
    assert isinstance(report["minutes"], float) and 0 < report["minutes"] < 60
    # random@k is the mean correctness of the same candidates: equal for every k and to pass@1
    assert report["random"]["32"] == pytest.approx(report["pass1_after_rl"])
    for png in ("accuracy_vs_k.png", "score_histograms.png", "training_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    md = (out / "report.md").read_text()
    assert "pass@1 before RL" in md and "| 32 (high) |" in md
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "score_module.pt").is_file()


def test_second_invocation_resumes(demo_runs):
    out, first, stopped, second = demo_runs
    assert stopped == ["data", "eval_before", "rl", "sft"]
    assert "stage report" not in first
    for stage in stopped:
        assert f"stage {stage:<11s} done, skipped" in second, stage
    for stage in ("eval_after", "prune", "export", "report"):
        assert f"stage {stage:<11s} finished" in second, stage
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # RL was not run again
    sft = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    # the feature phase (true step labels), then SFT with the outcome warm-up of a fresh head
    assert [(r["step"], r["phase"]) for r in sft] == [
        (1, "features"),
        (2, "features"),
        (3, "sft"),
        (4, "sft"),
        (5, "sft"),
    ]
    assert all("step_label_loss" in r for r in sft[:2])
    assert all("spr_loss" in r and "step_label_loss" not in r for r in sft[2:])
    # resuming with another recipe would mix two runs: refused before anything runs
    err = run_demo(out, "--config.sft.steps=4", expect_rc=1)
    assert "another recipe" in err and "['sft']" in err


@pytest.mark.parametrize("fmt", ["msjax", "hf"])
def test_eval_script_on_the_demo_model(demo_runs, tmp_path, fmt):
    from experiments.eval import evaluate

    out = demo_runs[0]
    rows = [
        {"problem": "Start with 3. Add 2. Subtract 1.", "answer": "4"},
        {"problem": "Start with 5. Multiply by 2. Subtract 3.", "answer": 7},
        {"problem": ""},  # counted as skipped, not evaluated
    ]
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = out / ("rl" if fmt == "msjax" else "hf")
    report = evaluate(
        str(model),
        data,
        tmp_path / "report.json",
        k_max=8,
        max_new_tokens=24,
        template="plain",
        suffix=None,
        temperature=1.0,
        batch_size=2,
        progress=False,
    )
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["problems"] == 2 and report["skipped"] == 1
    assert report["modes"] == {"low": 2, "medium": 8}
    for name in ("bon", "maj", "random", "weighted"):
        assert sorted(report[name]) == ["2", "8"]
        assert all(_fraction(v) for v in report[name].values())
    assert _fraction(report["pass1"]) and report["random"]["8"] == pytest.approx(report["pass1"])
    lines = (tmp_path / "report.candidates.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(json.loads(lines[0])["candidates"]) == 8
