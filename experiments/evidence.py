"""The multi-seed study: does SPRM Best-of-N beat majority voting in the paper's regime, and which
change to the SPR training helps? (docs/experiments.md, "Evidence in the paper's regime").

    python -m experiments.evidence [--config=experiments/configs/demo_hard.py[:micro]]
        [--out=evidence_out] [--seeds=0,1,2] [--variants=bce,spr:0.3,frozen] [--share_start]
        [--config.x=y]

For each seed s, the whole demo pipeline (`experiments.demo`: data, SFT, evaluation before RL,
GRPO + SPR, evaluation after RL, pruning, export, report) runs in out/seed<s>/original with the
recipe's own SPR rule and config.seed + s, config.eval.seed + s (seed 0 is the recipe itself;
the task's problems, and so the held-out problems, are the same for every seed). Each variant
then reuses that seed's data, tokenizer, SFT start and evaluation before RL, and runs the RL
stage and the evaluation after RL in out/seed<s>/<variant>, with the same RL seed, prompts and
rollout keys. Variants:

  bce          the SPR loss without its consistency filter and class balance (every step of a
               rollout weighted by its outcome label alone)
  spr:T        the original filter and balance with threshold T (the original is spr:0.5)
  soft:T       the expected filter of a sampled prediction (msjax.rl.spr, "soft")
  frozen       no SPR training in RL (head learning rate 0): the SPRM stays the SFT warm-up head,
               trained on the balanced SFT data only
  scope:S      the SPR class counts over each micro-batch ("microbatch", the default) or over the
               whole mini-batch by a statistics pre-pass ("minibatch"); differs from the original
               only when train.micro_batch_size splits the mini-batch

With --share_start, every seed after the first reuses the first seed's data, SFT start and
evaluation before RL (only the RL stage and the evaluation after it are seeded): a cheaper study of
a change that only acts in RL.

Every finished stage is kept, so an interrupted study resumes. Results: out/results.json (per
seed, pooled over seeds with 95% intervals over seeds and problems: the k-curves, BoN and the
SPRM-weighted vote each against majority; each variant against the original on the same seeds),
out/table.md and out/k_curve.png. A change becomes the recommended default only if it wins on
every seed: its BoN@k_max is above the original's by a margin the seed's paired 95% interval
over problems supports (the interval's lower end above 0).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags

from experiments.demo import Demo, config_flag, parse_variant, start_program, write_json
from experiments.demo_report import METHOD_LABELS, aha_curve
from msjax.evaluation import bootstrap_ci, k_curve
from msjax.metrics import read_metrics

log = logging.getLogger("evidence")
FLAGS = flags.FLAGS
ORIGINAL = "original"
SHARED = ("tokenizer", "data", "sft")  # what a variant reuses from its seed's original run
SHARED_STAGES = ("data", "sft", "eval_before")
SCOPES = ("scope:minibatch", "scope:microbatch")


def check_variant(text: str) -> str:
    """The variant's name, or ValueError naming the accepted forms."""
    if text == "frozen":
        return text
    if text.startswith("scope:"):
        if text not in SCOPES:
            raise ValueError(f"variant {text!r}: use {' or '.join(SCOPES)}")
        return text
    try:
        parse_variant(text)
    except ValueError as e:
        raise ValueError(f"{e}, frozen, or scope:minibatch|microbatch") from e
    return text


def seed_config(
    config: ml_collections.ConfigDict, seed: int, out: Path
) -> ml_collections.ConfigDict:
    """The recipe with the whole pipeline seeded by `seed` (not the task: same problems)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = config.seed + seed
    c.eval.seed = config.eval.seed + seed
    c.out_dir = str(out)
    c.compilation_cache = False  # one cache for the whole study (main)
    return c


def variant_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """A seed's config with `variant`'s SPR training, stopping after the evaluation after RL."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.out_dir = str(Path(config.out_dir).with_name(variant.replace(":", "_")))
    c.stop_after = "eval_after"
    if variant == "frozen":
        c.optim.head_lr = 0.0
    elif variant.startswith("scope:"):
        c.loss.spr_stats_scope = variant.partition(":")[2]
    else:
        c.loss.spr_variant, c.loss.spr_threshold = parse_variant(variant)
    return c


def share_start(original: Path, out: Path) -> None:
    """Links the original run's data, tokenizer and SFT start into a variant's folder and copies
    their stage markers, so the variant starts at the RL stage (once; idempotent)."""
    (out / "stages").mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if not (out / name).exists():
            os.symlink(original / name, out / name, target_is_directory=True)
    for stage in SHARED_STAGES:
        marker = out / "stages" / f"{stage}.json"
        if not marker.is_file():
            write_json(marker, json.loads((original / "stages" / f"{stage}.json").read_text()))


def run_seed(
    config: ml_collections.ConfigDict,
    seed: int,
    variants: list[str],
    out: Path,
    start: Path | None = None,
) -> bool:
    """The original pipeline and every variant of one seed; False when a run stopped early.
    `start`: another seed's original run whose data, SFT start and evaluation before RL this
    seed reuses (--share_start)."""
    base = seed_config(config, seed, out / f"seed{seed}" / ORIGINAL)
    if start is not None:
        share_start(start, Path(base.out_dir))
    log.info("seed %d: %s", seed, ORIGINAL)
    demo = Demo(base)
    demo.run()
    if demo.done("eval_after") is None:  # what the study reads (a report may follow later)
        return False
    for variant in variants:
        c = variant_config(base, variant)
        log.info("seed %d: %s", seed, variant)
        share_start(Path(base.out_dir), Path(c.out_dir))
        demo = Demo(c)
        demo.run()
        if demo.done("eval_after") is None:
            return False
    return True


def load_run(path: Path, k_max: int) -> dict:
    """A finished run's figures after RL and its per-problem accuracies {method: {k: f[P]}}."""
    before = json.loads((path / "stages" / "eval_before.json").read_text())
    after = json.loads((path / "stages" / "eval_after.json").read_text())
    npz = np.load(path / "after.npz")
    per: dict[str, dict[int, np.ndarray]] = {}
    for key in npz.files:
        if key.startswith("per_"):
            _, method, k = key.split("_")
            per.setdefault(method, {})[int(k)] = npz[key]
    aha = aha_curve(read_metrics(path / "rl"), "rollout_score_correct", "rollout_score_wrong", 5)
    k = str(k_max)
    return {
        "per": per,
        "figures": {
            "pass1_before_rl": before["pass1"],
            "pass1": after["pass1"],
            "bon": after["k_curve"]["bon"][k][0],
            "maj": after["k_curve"]["maj"][k][0],
            "weighted": after["k_curve"]["weighted"][k][0],
            "bon_vs_maj": after["bon_vs_maj"][k],
            # the paired difference per problem, bootstrapped over problems (as bon_vs_maj)
            "weighted_vs_maj": bootstrap_ci(per["weighted"][k_max] - per["maj"][k_max]),
            "step_auroc": after["step_auroc"],
            "traj_auroc": after["traj_auroc"],
            "traj_auroc_within": after["traj_auroc_within"],
            "aha_separation_step": aha["separation_step"],
        },
    }


def summarize(out: Path, seeds: list[int], variants: list[str], k_max: int) -> dict:
    """results.json: per seed, pooled over the seeds where every variant finished, and each
    variant against the original on those seeds."""
    names = [ORIGINAL, *variants]
    runs = {
        (v, s): load_run(out / f"seed{s}" / v.replace(":", "_"), k_max)
        for s in seeds
        for v in names
        if (out / f"seed{s}" / v.replace(":", "_") / "after.npz").is_file()
    }
    done = [s for s in seeds if all((v, s) in runs for v in names)]
    stack = lambda v, m, k: np.stack([runs[v, s]["per"][m][k] for s in done])
    result: dict = {"seeds": done, "variants": names, "k_max": k_max, "per_seed": {}}
    result["per_seed"] = {
        v: {str(s): runs[v, s]["figures"] for s in seeds if (v, s) in runs} for v in names
    }
    if not done:
        return result
    ks = sorted(runs[ORIGINAL, done[0]]["per"]["bon"])
    methods = ("bon", "maj", "weighted", "random")
    result["k_curve"] = {
        v: k_curve({m: {k: stack(v, m, k) for k in ks} for m in methods}) for v in names
    }
    for method in ("bon", "weighted"):
        result[f"{method}_vs_maj"] = {
            v: {str(k): bootstrap_ci(stack(v, method, k) - stack(v, "maj", k)) for k in ks}
            for v in names
        }
    base = stack(ORIGINAL, "bon", k_max)
    result["vs_original"] = {}
    for v in variants:
        diff = stack(v, "bon", k_max) - base
        per_seed = {str(s): bootstrap_ci(d) for s, d in zip(done, diff, strict=True)}
        result["vs_original"][v] = {
            "bon_diff_per_seed": per_seed,
            "bon_diff_pooled": bootstrap_ci(diff),
            "wins_every_seed": all(d[1] > 0 for d in per_seed.values()),  # interval above 0
        }
    winners = [v for v in variants if result["vs_original"][v]["wins_every_seed"]]
    result["recommended_default"] = max(
        winners, key=lambda v: result["vs_original"][v]["bon_diff_pooled"][0], default=ORIGINAL
    )
    return result


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _auc(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _ci(v: list[float], sign: str = "") -> str:
    return f"{100 * v[0]:{sign}.1f} [{100 * v[1]:{sign}.1f}, {100 * v[2]:{sign}.1f}]"


def table(result: dict) -> str:
    """Markdown: per seed and variant, then pooled over seeds, then against the original."""
    k = result["k_max"]
    lines = [
        f"| variant | seed | pass@1 before / after RL | BoN@{k} | maj@{k} | weighted@{k} "
        f"| BoN - maj @{k} | weighted - maj @{k} | step AUROC | traj AUROC (pooled / within) "
        "| aha step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, by_seed in result["per_seed"].items():
        for s, f in by_seed.items():
            lines.append(
                f"| {v} | {s} | {_pct(f['pass1_before_rl'])} / {_pct(f['pass1'])} | "
                f"{_pct(f['bon'])} | {_pct(f['maj'])} | {_pct(f['weighted'])} | "
                f"{_ci(f['bon_vs_maj'], '+')} | {_ci(f['weighted_vs_maj'], '+')} | "
                f"{_auc(f['step_auroc'])} | "
                f"{_auc(f['traj_auroc'])} / {_auc(f['traj_auroc_within'])} | "
                f"{f['aha_separation_step']} |"
            )
    if "k_curve" not in result:
        return "\n".join(lines) + "\n"
    ks = sorted(int(x) for x in result["k_curve"][ORIGINAL]["bon"])
    lines += [
        "",
        f"Pooled over seeds {result['seeds']} (95% intervals over seeds and problems), % at k:",
        "",
        "| variant | method | " + " | ".join(str(x) for x in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for v, curve in result["k_curve"].items():
        for m in ("bon", "maj", "weighted", "random"):
            cells = [_ci(curve[m][str(x)]) for x in ks]
            lines.append(f"| {v} | {m} | " + " | ".join(cells) + " |")
        for key, name in (("bon_vs_maj", "BoN - maj"), ("weighted_vs_maj", "weighted - maj")):
            diff = [_ci(result[key][v][str(x)], "+") for x in ks]
            lines.append(f"| {v} | {name} | " + " | ".join(diff) + " |")
    lines += ["", f"Against the original rule, BoN@{k} difference in points:", ""]
    for v, r in result.get("vs_original", {}).items():
        seeds = ", ".join(f"seed {s}: {_ci(d, '+')}" for s, d in r["bon_diff_per_seed"].items())
        lines.append(
            f"- {v}: {seeds}; pooled {_ci(r['bon_diff_pooled'], '+')}; "
            f"wins on every seed: {r['wins_every_seed']}"
        )
    lines += ["", f"Recommended default: {result['recommended_default']}", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Pooled k-curves, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result["k_curve"]
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.8), squeeze=False)
    for ax, (v, curve) in zip(axes[0], curves.items(), strict=True):
        ks = sorted(int(x) for x in curve["bon"])
        for name, label, style in METHOD_LABELS:
            acc, low, high = np.asarray([curve[name][str(x)] for x in ks]).T
            ax.errorbar(ks, acc, yerr=[acc - low, high - acc], fmt=style, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{v} ({len(result['seeds'])} seeds)")
        ax.set_xlabel("candidates k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (95% CI over seeds and problems)")
    axes[0][0].legend(fontsize=8)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    plt.close(fig)


def define_flags() -> None:
    """The study's flags (defined only when run as a program, like the demo's: absl has one
    flag registry per process, and msjax's CLIs define --out too)."""
    config_flag("demo_hard.py")
    flags.DEFINE_string("out", "evidence_out", "Output folder of the study.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the whole pipeline.")
    flags.DEFINE_list(
        "variants",
        ["bce", "spr:0.3", "frozen"],
        "Changes to compare against the original SPR rule.",
    )
    flags.DEFINE_bool(
        "share_start", False, "Seeds after the first reuse its data, SFT and evaluation before RL."
    )


def main(argv: list[str]) -> None:
    start_program(argv)
    if not all(s.isdigit() for s in FLAGS.seeds):
        raise app.UsageError(f"--seeds={FLAGS.seeds}: give non-negative integers, e.g. 0,1,2.")
    seeds = [int(s) for s in FLAGS.seeds]
    try:
        variants = [check_variant(v) for v in FLAGS.variants]
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if len(set(variants)) != len(variants) or ORIGINAL in variants:
        raise app.UsageError(f"--variants={variants}: list each change once, without 'original'.")
    config = FLAGS.config
    out = Path(FLAGS.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
        for seed in seeds:
            start = None
            if FLAGS.share_start and seed != seeds[0]:
                start = out / f"seed{seeds[0]}" / ORIGINAL
            if not run_seed(config, seed, variants, out, start):
                log.warning("seed %d stopped before finishing; run again to resume", seed)
                return
    except ValueError as e:  # e.g. a resumed run with another recipe
        raise app.UsageError(str(e)) from e
    result = summarize(out, seeds, variants, config.eval.k_max)
    write_json(out / "results.json", result)
    (out / "table.md").write_text(table(result), encoding="utf-8")
    if "k_curve" in result:
        plot(result, out / "k_curve.png")
    print(table(result))


if __name__ == "__main__":
    define_flags()
    app.run(main)
