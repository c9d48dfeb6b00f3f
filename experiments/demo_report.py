"""The demo's report: report.json, report.md and the PNG plots, from the stage markers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from msjax.evaluation import separation_step
from msjax.metrics import read_metrics
from msjax.tokenizer import atomic_write_text

MODES = {2: "low", 8: "medium", 32: "high"}  # the paper's reasoning-effort modes
METHOD_LABELS = (
    ("bon", "Best-of-k by SPRM", "o-"),
    ("maj", "majority vote", "s-"),
    ("weighted", "SPRM-weighted vote", "^--"),
    ("random", "random pick", "x:"),
)

GOALS = {
    "pass@1 after RL > before": lambda r: r["pass1_after_rl"] > r["pass1_before_rl"],
    "BoN@32 > pass@1 and > random@32": lambda r: (
        r["bon"]["32"] > r["pass1_after_rl"] and r["bon"]["32"] > r["random"]["32"]
    ),
    "step AUROC >= 0.85": lambda r: r["step_auroc"] >= 0.85,
    "trajectory AUROC >= 0.9": lambda r: r["traj_auroc"] >= 0.9,
    "pruning saves >= 30% tokens": lambda r: r["prune_token_savings"] >= 0.30,
    "pruning accuracy within 1 point": lambda r: abs(r["prune_accuracy_change"]) <= 0.01,
    "HF greedy parity": lambda r: r["hf_greedy_parity"],
    "BoN rises from k = 2 to k_max": lambda r: (
        r["k_curve"]["bon"][str(r["eval_k_max"])][0] > r["k_curve"]["bon"]["2"][0]
    ),
    "BoN@k_max >= pass@1 + 10 points": lambda r: (
        r["k_curve"]["bon"][str(r["eval_k_max"])][0] >= r["pass1_after_rl"] + 0.10
    ),
    "BoN@k_max > majority@k_max (95% interval of the difference above 0)": lambda r: (
        r["bon_vs_maj"][str(r["eval_k_max"])][1] > 0
    ),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def plot_accuracy_vs_k(report: dict, path: Path) -> None:
    """Accuracy against k with the 95% intervals over problems (report["k_curve"])."""
    plt = _plt()
    curve = report["k_curve"]
    ks = sorted(int(k) for k in curve["bon"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, label, style in METHOD_LABELS:
        acc, low, high = np.asarray([curve[name][str(k)] for k in ks], np.float64).T
        ax.errorbar(ks, acc, yerr=[acc - low, high - acc], fmt=style, capsize=3, label=label)
    ax.axhline(report["pass1_after_rl"], color="gray", lw=1, label="pass@1 after RL")
    ax.axhline(report["pass1_before_rl"], color="gray", lw=1, ls="--", label="pass@1 before RL")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [f"{k}\n({MODES[k]})" if k in MODES else str(k) for k in ks])
    ax.set_xlabel("candidates k (mode)")
    ax.set_ylabel("accuracy on held-out problems (95% CI)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_accuracy_vs_tokens(report: dict, path: Path) -> None:
    """The scaling-law plot: accuracy against generated tokens per problem, without pruning
    (every k of the k-curve) and with SPRM pruning (each k sampled with the prune rule)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for part, style in (("full", "-"), ("pruned", "--")):
        rows = report["tokens_curve"][part]
        ks = sorted(rows, key=int)
        tokens = [rows[k]["tokens_per_problem"] for k in ks]
        for name, marker in (("bon", "o"), ("maj", "s")):
            acc, low, high = np.asarray([rows[k][name] for k in ks], np.float64).T
            label = f"{'BoN by SPRM' if name == 'bon' else 'majority'}, {part}"
            ax.errorbar(tokens, acc, yerr=[acc - low, high - acc], fmt=marker + style,
                        capsize=3, label=label)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens per problem (all k candidates)")
    ax.set_ylabel("accuracy on held-out problems (95% CI)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def _density(ax, values: np.ndarray, bins, label: str) -> None:
    """A normalised histogram of `values`, left out when there are none (an empty class)."""
    if len(values):
        ax.hist(values, bins, alpha=0.6, label=f"{label} ({len(values)})", density=True)


def plot_score_histograms(npz: Path, path: Path) -> None:
    plt = _plt()
    d = np.load(npz)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(0, 1, 26)
    correct = d["correct"].ravel()
    traj = d["traj_scores"].ravel()
    _density(axes[0], traj[correct], bins, "correct")
    _density(axes[0], traj[~correct], bins, "wrong")
    axes[0].set_title("trajectory score (geometric mean of steps)")
    if "step_on_track" in d:
        on, s = d["step_on_track"], d["step_scores"]
        _density(axes[1], s[on], bins, "on-track steps")
        _density(axes[1], s[~on], bins, "off-track steps")
    axes[1].set_title("step score vs TRUE step label")
    for ax in axes:
        ax.set_xlabel("SPRM score")
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def _smooth(values: list[float], window: int = 20) -> np.ndarray:
    """Trailing mean over up to `window` values."""
    v = np.asarray(values, np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    lo = np.maximum(np.arange(1, len(v) + 1) - window, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(v) + 1) - lo)


def aha_curve(rows: list[dict], correct: str, wrong: str, window: int) -> dict:
    """Mean SPRM score of correct vs wrong samples per logged step, and the step from which
    they stay separated (`msjax.evaluation.separation_step`, trailing mean over `window`)."""
    rows = [r for r in rows if correct in r]
    steps = [r["step"] for r in rows]
    c = [r.get(correct, math.nan) for r in rows]
    w = [r.get(wrong, math.nan) for r in rows]
    sep = separation_step(steps, c, w, window=window) if steps else None
    return {"steps": steps, "correct": c, "wrong": w, "separation_step": sep, "window": window}


def plot_training_curves(aha: dict, rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, part, title, labels in (
        (axes[0], "sft", "SFT: mean SPRM score of the SFT data", ("gold", "flawed")),
        (axes[1], "rl", "RL: mean SPRM score of rollouts", ("correct", "wrong")),
    ):
        a = aha[part]
        if not a["steps"]:
            continue
        w = a["window"]
        ax.plot(a["steps"], _smooth(a["correct"], w), label=f"{labels[0]} ({w}-step mean)")
        ax.plot(a["steps"], _smooth(a["wrong"], w), label=f"{labels[1]} ({w}-step mean)")
        if a["separation_step"] is not None:
            ax.axvline(a["separation_step"], color="k", ls=":", lw=1,
                       label=f"separated from step {a['separation_step']}")  # fmt: skip
        ax.set_title(title)
    axes[0].set_xlabel("SFT step")
    if rows:
        x = [r["step"] for r in rows]
        get = lambda k: [r.get(k, math.nan) for r in rows]
        axes[2].plot(x, get("reward"), label="reward (accuracy)")
        if "spr_kept_frac" in rows[0]:
            axes[2].plot(x, get("spr_kept_frac"), label="SPR kept-step fraction")
    axes[2].set_title("RL: reward")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[1:]:
        ax.set_xlabel("RL step")
    _save(fig, path)
    plt.close(fig)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _ci(v: list[float]) -> str:
    return f"{100 * v[0]:.1f} [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"


def markdown(report: dict, config) -> str:
    features = ""
    if config.sft.get("feature_steps"):
        features = (
            f"feature phase {config.sft.feature_steps} steps (true {config.sft.feature_label} "
            "step labels, head discarded), "
        )
    lines = [
        "# msjax demo report",
        "",
        f"Synthetic step task ({config.task.min_steps}-{config.task.max_steps} operations), "
        f"Qwen2-architecture model with hidden size {config.model.hidden_size}, "
        f"{config.model.num_layers} layers; {features}SFT {config.sft.steps} steps, GRPO + SPR "
        f"{config.total_steps} steps; {report['eval_problems']} held-out problems, "
        f"{report['eval_k_max']} samples each at temperature {config.eval.temperature}. "
        f"Total {report['minutes']:.1f} minutes.",
        "",
        "| | value |",
        "|---|---|",
        f"| pass@1 before RL | {_pct(report['pass1_before_rl'])} |",
        f"| pass@1 after RL | {_pct(report['pass1_after_rl'])} |",
        f"| trajectory AUROC (correct vs wrong) | {_num(report['traj_auroc'])} |",
        f"| trajectory AUROC within a problem (what BoN needs) | "
        f"{_num(report['traj_auroc_within'])} |",
        f"| step AUROC vs true on-track labels | {_num(report['step_auroc'])} |",
        f"| step AUROC vs true locally-correct labels | {_num(report['step_auroc_local'])} |",
        f"| pruning token savings ({report['prune_rule']}) | "
        f"{_pct(report['prune_token_savings'])} |",
        f"| pruning accuracy change (BoN@{report['eval_k_max']}) | "
        f"{100 * report['prune_accuracy_change']:+.1f} points |",
        f"| pruning accuracy change (maj@{report['eval_k_max']}) | "
        f"{100 * report['prune_maj_accuracy_change']:+.1f} points |",
        f"| HF greedy parity | {report['hf_greedy_parity']} |",
        "",
        "Accuracy at k, % with the 95% bootstrap interval over problems:",
        "",
        "| k (mode) | BoN by SPRM | majority | SPRM-weighted vote | random | BoN - majority |",
        "|---|---|---|---|---|---|",
    ]
    curve = report["k_curve"]
    for k in sorted(int(k) for k in curve["bon"]):
        row = [_ci(curve[n][str(k)]) for n in ("bon", "maj", "weighted", "random")]
        diff = report["bon_vs_maj"][str(k)]
        row.append(f"{100 * diff[0]:+.1f} [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}]")
        mode = f" ({MODES[k]})" if k in MODES else ""
        lines.append(f"| {k}{mode} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Accuracy against generated tokens per problem (without / with SPRM pruning):",
        "",
        "| k | tokens | BoN | majority | tokens, pruned | BoN, pruned | majority, pruned |",
        "|---|---|---|---|---|---|---|",
    ]
    full, pruned = report["tokens_curve"]["full"], report["tokens_curve"]["pruned"]
    for k in sorted(full, key=int):
        cells = [f"{full[k]['tokens_per_problem']:.0f}", _ci(full[k]["bon"]), _ci(full[k]["maj"])]
        if k in pruned:
            p = pruned[k]
            cells += [f"{p['tokens_per_problem']:.0f}", _ci(p["bon"]), _ci(p["maj"])]
        else:
            cells += ["", "", ""]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, when in (("error_kinds_before_rl", "before RL"), ("error_kinds", "after RL")):
        if report[key] is not None:
            kinds = ", ".join(f"{kind} {n}" for kind, n in report[key].items()) or "none"
            lines.append(f"- Wrong candidates {when} by their first error: {kinds}.")
    for part, what in (("sft", "SFT data (gold vs flawed)"), ("rl", "RL rollouts")):
        a = report["aha"][part]
        sep = a["separation_step"]
        stays = f"from step {sep} on" if sep is not None else "not by the end of the run"
        lines.append(
            f"- Mean SPRM score, {what}: correct and wrong separated by >= 0.1 for good "
            f"({a['window']}-step mean): {stays}."
        )
    lines += ["", "## Goals", ""]
    for name, ok in report["goals"].items():
        lines.append(f"- [{'x' if ok else ' '}] {name}")
    lines += [
        "",
        "Plots: `accuracy_vs_k.png`, `accuracy_vs_tokens.png`, `score_histograms.png`, "
        "`training_curves.png`.",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, config, stages: dict) -> dict:
    """Assembles report.json / report.md / plots under `out` from the stage results."""
    before, after, prune = stages["eval_before"], stages["eval_after"], stages["prune"]
    rows = read_metrics(out / "rl")
    report = {
        "pass1_before_rl": before["pass1"],
        "pass1_after_rl": after["pass1"],
        "bon": after["bon"],
        "maj": after["maj"],
        "random": after["random"],
        "weighted": after["weighted"],
        "traj_auroc": after["traj_auroc"],
        "traj_auroc_within": after["traj_auroc_within"],
        "step_auroc": after["step_auroc"],
        "step_auroc_local": after["step_auroc_local"],
        "prune_token_savings": prune["token_savings"],
        "prune_accuracy_change": prune["accuracy_change"],
        "prune_rule": prune["rule"],
        "prune_maj_accuracy_change": prune["maj"] - prune["maj_full"],
        "hf_greedy_parity": bool(stages["export"]["hf_greedy_parity"]),
        "minutes": sum(s.get("seconds", 0.0) for s in stages.values()) / 60.0,
        "stage_minutes": {k: v.get("seconds", 0.0) / 60.0 for k, v in stages.items()},
        "before_rl": {
            k: before[k] for k in ("traj_auroc", "traj_auroc_within", "step_auroc", "bon", "maj")
        },
        "eval_problems": after["problems"],
        "eval_k_max": after["k"],
        "k_curve": after["k_curve"],
        "k_curve_before_rl": before["k_curve"],
        "bon_vs_maj": after["bon_vs_maj"],
        # absent from evaluations written before the key existed (a run resumed across versions)
        "error_kinds": after.get("error_kinds"),
        "error_kinds_before_rl": before.get("error_kinds"),
        "tokens_curve": {
            "full": {
                k: {
                    "tokens_per_problem": t,
                    **{m: after["k_curve"][m][k] for m in ("bon", "maj", "weighted")},
                }
                for k, t in after["tokens_per_problem"].items()
            },
            "pruned": prune["curve"],
        },
        "aha": {
            "sft": aha_curve(read_metrics(out / "sft"), "score_correct", "score_wrong", 20),
            "rl": aha_curve(rows, "rollout_score_correct", "rollout_score_wrong", 5),
        },
    }
    report["goals"] = {name: bool(check(report)) for name, check in GOALS.items()}
    report = json.loads(json.dumps(report).replace("NaN", "null"))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(report, config))
    plot_accuracy_vs_k(report, out / "accuracy_vs_k.png")
    plot_accuracy_vs_tokens(report, out / "accuracy_vs_tokens.png")
    plot_score_histograms(out / "after.npz", out / "score_histograms.png")
    plot_training_curves(report["aha"], rows, out / "training_curves.png")
    return report
