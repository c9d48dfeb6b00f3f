"""The whole demo pipeline on the micro recipe: report keys and ranges, plots, HF parity, resume;
the multi-seed study (experiments.evidence) on the same recipe."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msjax.data import STEP_ERRORS

ROOT = Path(__file__).resolve().parents[1]
KS = ("2", "8", "32")
pytestmark = pytest.mark.expensive(minutes=5)


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
    for png in (
        "accuracy_vs_k.png",
        "accuracy_vs_tokens.png",
        "score_histograms.png",
        "training_curves.png",
    ):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    md = (out / "report.md").read_text()
    assert "pass@1 before RL" in md and "| 32 (high) |" in md and "BoN - majority" in md
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "score_module.pt").is_file()
    # every SFT example fits the micro recipe's max_len: none skipped
    sft = json.loads((out / "stages" / "sft.json").read_text())
    assert sft["data"]["examples"] == 128 and sft["data"]["too_long"] == 0


def test_report_of_evaluations_without_error_kinds(demo_runs, tmp_path):
    """A run resumed across versions: its evaluations predate the error-kind counts."""
    from experiments.configs import demo
    from experiments.demo import STAGES
    from experiments.demo_report import write_report

    out = tmp_path / "run"
    shutil.copytree(demo_runs[0], out, ignore=shutil.ignore_patterns("hf", "jax_cache"))
    stages = {}
    for name in STAGES[:-1]:
        stage = json.loads((out / "stages" / f"{name}.json").read_text())
        stage.pop("error_kinds", None)
        stages[name] = stage
    report = write_report(out, demo.get_config("micro"), stages)
    assert report["error_kinds"] is None and report["error_kinds_before_rl"] is None
    assert "by their first error" not in (out / "report.md").read_text()
    assert "by their first error" in (demo_runs[0] / "report.md").read_text()


def test_report_k_curve_tokens_and_aha(demo_runs):
    out = demo_runs[0]
    report = json.loads((out / "report.json").read_text())
    after = json.loads((out / "stages" / "eval_after.json").read_text())
    prune = json.loads((out / "stages" / "prune.json").read_text())
    pass1 = report["pass1_after_rl"]
    curve = report["k_curve"]
    assert sorted(curve) == ["bon", "maj", "random", "weighted"]
    for name, by_k in curve.items():
        assert sorted(by_k, key=int) == ["1", "2", "4", "8", "16", "32"], name
        for k, (acc, low, high) in by_k.items():
            assert 0.0 <= low <= acc <= high <= 1.0, (name, k)
            if k in report[name]:
                assert acc == pytest.approx(report[name][k]), (name, k)
        # one candidate: every rule picks it; random is pass@1 at every k
        assert by_k["1"][0] == pytest.approx(pass1), name
    assert all(v[0] == pytest.approx(pass1) for v in curve["random"].values())
    assert sorted(report["k_curve_before_rl"]["bon"], key=int) == ["1", "2", "4", "8", "16", "32"]
    # every wrong candidate has one first error (msjax.data.first_error), or none / pruned
    wrong = round((1 - pass1) * report["eval_problems"] * report["eval_k_max"])
    assert sum(report["error_kinds"].values()) == wrong
    assert set(report["error_kinds"]) <= {*STEP_ERRORS, "none", "pruned"}
    for k, (diff, low, high) in report["bon_vs_maj"].items():
        assert diff == pytest.approx(curve["bon"][k][0] - curve["maj"][k][0])
        assert -1.0 <= low <= diff <= high <= 1.0
    # tokens: k candidates cost k times a candidate's mean length; pruning never costs more
    per_candidate = after["tokens_generated"] / (report["eval_problems"] * report["eval_k_max"])
    full, pruned = report["tokens_curve"]["full"], report["tokens_curve"]["pruned"]
    for k, row in full.items():
        assert row["tokens_per_problem"] == pytest.approx(int(k) * per_candidate)
        assert row["bon"] == curve["bon"][k]
    assert sorted(pruned, key=int) == ["2", "8", "32"]
    assert pruned["32"]["tokens_per_problem"] == pytest.approx(
        prune["tokens_generated"] / report["eval_problems"]
    )
    assert pruned["32"]["bon"][0] == pytest.approx(prune["bon"])
    # aha: the RL steps and the SFT phase-2 steps, separation step one of them or null
    aha = report["aha"]
    assert aha["rl"]["steps"] == [1, 2] and aha["sft"]["steps"] == [3, 4, 5]
    for part in ("rl", "sft"):
        a = aha[part]
        assert len(a["correct"]) == len(a["wrong"]) == len(a["steps"])
        assert a["separation_step"] is None or a["separation_step"] in a["steps"]
    assert "BoN@k_max > majority@k_max (95% interval of the difference above 0)" in report["goals"]


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


def test_evidence_study_at_micro_scale(demo_runs, tmp_path):
    """Two seeds x the original rule and two changes; seed 0's original is the demo run above
    (same recipe and seeds), so only seed 1's and the variants' RL and evaluation after RL run
    here: seed 1 shares seed 0's SFT start (--share_start) and the study stops each run after
    its evaluation after RL (the demo test above covers the later stages)."""
    out = tmp_path / "study"
    shutil.copytree(demo_runs[0], out / "seed0" / "original", symlinks=True)
    # the same programs compile for seed 1 and the variants: start from the demo's cache
    shutil.copytree(demo_runs[0] / "jax_cache", out / "jax_cache")
    cmd = [
        sys.executable,
        "-m",
        "experiments.evidence",
        f"--config={ROOT / 'experiments/configs/demo_hard.py'}:micro",
        f"--out={out}",
        "--seeds=0,1",
        "--variants=bce,frozen",
        "--share_start",
        "--config.stop_after=eval_after",
        "--config.log.progress=False",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stage rl          done, skipped" in proc.stderr  # seed 0's original was reused
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == [0, 1] and result["variants"] == ["original", "bce", "frozen"]
    # seed 1: seeded RL and evaluation from seed 0's SFT start, on the same problems
    seed0, seed1 = (json.loads((out / f"seed{s}/original/config.json").read_text()) for s in (0, 1))
    assert seed1["seed"] == seed0["seed"] + 1 and seed1["eval"]["seed"] == seed0["eval"]["seed"] + 1
    assert seed1["task"] == seed0["task"]
    assert (out / "seed1/original/sft").resolve() == (out / "seed0/original/sft").resolve()
    assert not (out / "seed1/original/stages/prune.json").exists()
    # each variant trained from its seed's SFT start, stopping after the evaluation after RL
    for variant in ("bce", "frozen"):
        run = out / "seed1" / variant
        assert (run / "sft").resolve() == (out / "seed1" / "original" / "sft").resolve()
        assert (run / "stages" / "eval_after.json").is_file()
        assert not (run / "stages" / "prune.json").exists()
        rows = (run / "rl" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == [1, 2]
    # pooled over seeds = the mean of the seeds' own figures (same problems, one value each)
    for variant in result["variants"]:
        per_seed = [result["per_seed"][variant][s] for s in ("0", "1")]
        curve = result["k_curve"][variant]
        assert sorted(curve["bon"], key=int) == ["1", "2", "4", "8", "16", "32"]
        for name in ("bon", "maj"):
            acc, low, high = curve[name]["32"]
            assert acc == pytest.approx(np.mean([f[name] for f in per_seed]))
            assert 0.0 <= low <= acc <= high <= 1.0
        assert curve["random"]["1"][0] == pytest.approx(np.mean([f["pass1"] for f in per_seed]))
        for method in ("bon", "weighted"):
            diff, low, high = result[f"{method}_vs_maj"][variant]["32"]
            assert diff == pytest.approx(curve[method]["32"][0] - curve["maj"]["32"][0])
            assert -1.0 <= low <= diff <= high <= 1.0
            for f in per_seed:
                assert f[f"{method}_vs_maj"][0] == pytest.approx(f[method] - f["maj"])
        # a variant starts RL from its seed's SFT: the same figures before RL
        for s in ("0", "1"):
            assert result["per_seed"][variant][s]["pass1_before_rl"] == pytest.approx(
                result["per_seed"]["original"][s]["pass1_before_rl"]
            )
    report0 = json.loads((out / "seed0" / "original" / "report.json").read_text())
    assert result["per_seed"]["original"]["0"]["bon"] == pytest.approx(report0["bon"]["32"])
    for variant, r in result["vs_original"].items():
        diffs = r["bon_diff_per_seed"]
        want = [
            result["per_seed"][variant][s]["bon"] - result["per_seed"]["original"][s]["bon"]
            for s in ("0", "1")
        ]
        assert [diffs[s][0] for s in ("0", "1")] == pytest.approx(want)
        assert r["wins_every_seed"] == all(diffs[s][1] > 0 for s in ("0", "1"))
    winners = [v for v, r in result["vs_original"].items() if r["wins_every_seed"]]
    assert result["recommended_default"] in (winners or ["original"])
    table = (out / "table.md").read_text()
    assert "| frozen | 1 |" in table and "Recommended default" in table
    assert (out / "k_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("variant", ["", "long"])
def test_hard_recipe_fits_its_problems(variant):
    """Every drawn problem's prompt and gold response fit the hard recipe's length limits (a
    truncated gold solution could never be generated, nor trained on)."""
    from experiments.configs import demo_hard
    from msjax.data import Difficulty, build_synthetic_tokenizer
    from msjax.data.synthetic import gold_solution, sample_problem
    from msjax.tokenizer import render_prompt

    c = demo_hard.get_config(variant)
    t = c.task
    d = Difficulty(t.min_steps, t.max_steps, t.max_start, t.max_operand, t.max_value, t.ops)
    tok = build_synthetic_tokenizer(None, vocab_size=c.model.vocab_size)
    rng = np.random.default_rng(0)
    steps = set()
    for _ in range(300):
        p = sample_problem(rng, d)
        steps.add(len(p.ops))
        prompt = len(tok.encode(render_prompt(p.text, c.data.template, c.data.suffix or None)))
        response = len(tok.encode(gold_solution(p))) + 1  # + EOS
        assert prompt <= c.data.max_prompt_len, p.text
        assert response <= min(c.rollout.max_new_tokens, c.eval.max_new_tokens), p.text
        assert prompt + response <= c.sft.max_len, p.text
    assert steps == set(range(t.min_steps, t.max_steps + 1))  # a mix of difficulties
    assert c.eval.num_problems >= 256 and c.task.num_test >= c.eval.num_problems
