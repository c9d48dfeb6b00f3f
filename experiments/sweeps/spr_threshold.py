"""SPR threshold sweep: the demo's RL stage with SPR thresholds 0.3 ... 0.7 and the unfiltered BCE
baseline, from one common start (the demo's SFT checkpoint), same seeds.

    python -m experiments.demo --config.stop_after=sft          # the common start, once
    python -m experiments.sweeps.spr_threshold [--config=experiments/configs/demo.py]
        [--out=demo_out/sweep] [--variants=bce,spr:0.3,spr:0.4,spr:0.5,spr:0.6,spr:0.7]
        [--head=warm|cold] [--eval_every=10] [--eval_k=8] [--config.total_steps=N]

Every variant trains in out/<head>/<variant> (the trainer resumes by itself), saving a checkpoint
every `eval_every` RL steps; each checkpoint (and the common start, as step 0) is evaluated on the
demo's held-out problems with eval_k samples each: step AUROC against the true on-track labels,
trajectory AUROC, BoN@eval_k, pass@1. The kept-step fraction comes from the trainer's
metrics.jsonl. --head=cold re-initialises the SPRM head of the start (the policy stays the SFT
one), so the SPR filter starts from an untrained head. Results: out/<head>/results.json, a
Markdown table out/<head>/table.md and out/<head>/spr_threshold.png; finished evaluations are
cached, so an interrupted sweep resumes.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from absl import app, flags

from experiments.demo import Demo, config_flag, parse_variant, start_program, write_json
from msjax import checkpoint as ckpt
from msjax.metrics import read_metrics

log = logging.getLogger("sweep")
FLAGS = flags.FLAGS


def cold_start(sft_dir: Path, out: Path, seed: int) -> Path:
    """out/init_cold: the SFT policy with a freshly initialised SPRM head (written once)."""
    if ckpt.is_checkpoint_dir(out) and ckpt.latest_step(out) is not None:
        return out
    from flax import nnx

    from msjax.models import create_model

    model, cfg = ckpt.load_model(sft_dir)
    fresh = create_model(cfg, seed=seed + 1)
    model.head = fresh.head
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt.save_model(
        tmp, nnx.state(model, nnx.Param), cfg, tokenizer_dir=ckpt.tokenizer_dir(sft_dir)
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def evaluate_step(demo: Demo, cache: Path, ckpt_dir: Path, step: int, k: int) -> dict:
    """Evaluation of one checkpoint step, cached in `cache` (JSON)."""
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    cands = demo.evaluate(ckpt_dir, k, step=step)
    m = demo.summary(cands, [k])
    result = {
        "step": step,
        "step_auroc": m["step_auroc"],
        "step_auroc_local": m["step_auroc_local"],
        "traj_auroc": m["traj_auroc"],
        "bon": m["bon"][str(k)],
        "maj": m["maj"][str(k)],
        "pass1": m["pass1"],
    }
    write_json(cache, result)
    return result


def run_variant(demo: Demo, init: Path, workdir: Path, variant: str, every: int) -> list[dict]:
    """Trains one variant to config.total_steps (resuming); returns its metrics rows."""
    from msjax.rl.trainer import Trainer

    name, threshold = parse_variant(variant)
    c = demo.rl_config()
    c.workdir = str(workdir)
    c.init = str(init)
    c.loss.spr_variant = name
    c.loss.spr_threshold = threshold
    c.checkpoint.every_steps = every
    c.checkpoint.keep = 10_000
    if ckpt.is_checkpoint_dir(workdir) and ckpt.latest_step(workdir) == c.total_steps:
        return read_metrics(workdir)
    trainer = Trainer(c)
    try:
        trainer.run()
    finally:
        trainer.close()
    if trainer.rl_step < c.total_steps:
        raise KeyboardInterrupt(f"{variant} stopped at step {trainer.rl_step}; run again to resume")
    return read_metrics(workdir)


def _mean(rows: list[dict], key: str, lo: int, hi: int) -> float:
    vals = [r[key] for r in rows if lo <= r["step"] <= hi and key in r]
    return float(sum(vals) / len(vals)) if vals else math.nan


def table(results: dict, k: int) -> str:
    """Markdown table of the final evaluation and the kept fraction of each variant."""
    lines = [
        f"| variant | step AUROC (on-track) | step AUROC (local) | traj AUROC | BoN@{k} | pass@1 "
        "| kept frac (first 5 steps) | kept frac (last 5 steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
    for variant, r in results.items():
        last = r["evals"][-1]
        n = max((row["step"] for row in r["metrics"]), default=0)
        cells = [
            last["step_auroc"],
            last["step_auroc_local"],
            last["traj_auroc"],
            last["bon"],
            last["pass1"],
            _mean(r["metrics"], "spr_kept_frac", 1, 5),
            _mean(r["metrics"], "spr_kept_frac", n - 4, n),
        ]
        lines.append(f"| {variant} | " + " | ".join(fmt(x) for x in cells) + " |")
    first = next(iter(results.values()))["evals"][0]
    lines.append(
        f"| start (step 0) | {fmt(first['step_auroc'])} | {fmt(first['step_auroc_local'])} | "
        f"{fmt(first['traj_auroc'])} | {fmt(first['bon'])} | {fmt(first['pass1'])} | | |"
    )
    return "\n".join(lines) + "\n"


def plot(results: dict, k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    panels = (
        ("step_auroc", "step AUROC (true on-track labels)"),
        ("traj_auroc", "trajectory AUROC"),
        ("bon", f"BoN@{k} accuracy"),
        ("bon_gain", f"BoN@{k} - pass@1 (what the SPRM adds)"),
    )

    def value(e: dict, key: str) -> float:
        if key == "bon_gain":
            return e["bon"] - e["pass1"]
        return math.nan if e[key] is None else e[key]

    for variant, r in results.items():
        x = [e["step"] for e in r["evals"]]
        for ax, (key, _) in zip(axes, panels, strict=False):
            ax.plot(x, [value(e, key) for e in r["evals"]], "o-", label=variant)
        rows = r["metrics"]
        kept = [m.get("spr_kept_frac", math.nan) for m in rows]
        axes[4].plot([m["step"] for m in rows], kept, label=variant)
    axes[3].axhline(0.0, color="gray", lw=1)
    for ax, (_, title) in zip(axes, (*panels, ("", "SPR kept-step fraction")), strict=True):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    plt.close(fig)


def main(argv: list[str]) -> None:
    start_program(argv)
    try:
        variants = {v: parse_variant(v) for v in FLAGS.variants}
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    config = FLAGS.config
    demo = Demo(config)
    sft = demo.paths["sft"]
    if not ckpt.is_checkpoint_dir(sft):
        raise app.UsageError(
            f"{sft} holds no SFT checkpoint; run `python -m experiments.demo "
            "--config.stop_after=sft` (same --config) first."
        )
    out = Path(FLAGS.out).absolute() / FLAGS.head
    init = sft if FLAGS.head == "warm" else cold_start(sft, out / "init_cold", config.seed)
    k, every = FLAGS.eval_k, FLAGS.eval_every
    start = evaluate_step(demo, out / "evals" / "start.json", init, ckpt.latest_step(init), k)
    start = {**start, "step": 0}
    results = {}
    for variant in variants:
        workdir = out / variant.replace(":", "_")
        log.info("variant %s -> %s", variant, workdir)
        metrics = run_variant(demo, init, workdir, variant, every)
        steps = sorted(
            s for s in _saved_steps(workdir) if s % every == 0 or s == config.total_steps
        )
        evals = [start] + [
            evaluate_step(demo, out / "evals" / f"{workdir.name}-{s}.json", workdir, s, k)
            for s in steps
        ]
        results[variant] = {"metrics": metrics, "evals": evals}
        write_json(out / "results.json", results)
    (out / "table.md").write_text(table(results, k), encoding="utf-8")
    plot(results, k, out / "spr_threshold.png")
    print(table(results, k))


def _saved_steps(workdir: Path) -> list[int]:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(ckpt.checkpoints_path(workdir), options=options) as m:
        return list(m.all_steps())


def define_flags() -> None:
    """The sweep's flags (defined only when run as a program, as the demo's)."""
    config_flag()
    flags.DEFINE_string("out", "demo_out/sweep", "Output folder.")
    flags.DEFINE_list(
        "variants", ["bce", "spr:0.3", "spr:0.4", "spr:0.5", "spr:0.6", "spr:0.7"], "Loss variants."
    )
    flags.DEFINE_enum("head", "warm", ["warm", "cold"], "SPRM head of the common start.")
    flags.DEFINE_integer("eval_every", 10, "RL steps between evaluated checkpoints.")
    flags.DEFINE_integer("eval_k", 8, "Samples per held-out problem.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
