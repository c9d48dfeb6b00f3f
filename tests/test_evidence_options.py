"""experiments.evidence options that need no pipeline run: the SPR-scope variant and
--share_start (seeds after the first reuse its data, SFT start and evaluation before RL)."""

import json
from pathlib import Path

import pytest

import msjax.cli.convert  # noqa: F401  (defines --out: importing the study beside it must work)
from experiments import evidence
from experiments.configs import demo
from msjax.rl.config import loss_config


def test_scope_variant_sets_the_spr_statistics_scope():
    c = demo.get_config()
    c.train.micro_batch_size = 16
    c.out_dir = "/tmp/x/seed0/original"
    for scope in ("minibatch", "microbatch"):
        v = evidence.variant_config(c, evidence.check_variant(f"scope:{scope}"))
        assert v.loss.spr_stats_scope == scope and v.out_dir.endswith(f"scope_{scope}")
        assert loss_config(v).num_microbatches == 4
    with pytest.raises(ValueError, match="scope:minibatch"):
        evidence.check_variant("scope:global")


class _FakeDemo:
    """Records the runs; 'runs' the stages a real run would not skip."""

    runs: list = []

    def __init__(self, c):
        self.out = Path(c.out_dir)
        self.seed = c.seed

    def run(self):
        stages = self.out / "stages"
        skipped = sorted(p.stem for p in stages.glob("*.json")) if stages.is_dir() else []
        _FakeDemo.runs.append((self.out.parent.name, self.out.name, self.seed, skipped))
        for name in ("data", "tokenizer", "sft"):
            (self.out / name).mkdir(parents=True, exist_ok=True)
        for stage in evidence.SHARED_STAGES + ("rl", "eval_after"):
            if stage not in skipped:
                evidence.write_json(stages / f"{stage}.json", {"by": str(self.out)})
        return True

    def done(self, stage):
        return json.loads((self.out / "stages" / f"{stage}.json").read_text())


def test_share_start_reuses_the_first_seeds_start(tmp_path, monkeypatch):
    monkeypatch.setattr(evidence, "Demo", _FakeDemo)
    _FakeDemo.runs = []
    config = demo.get_config()
    first = tmp_path / "seed0" / evidence.ORIGINAL
    assert evidence.run_seed(config, 0, ["bce"], tmp_path)
    assert evidence.run_seed(config, 1, ["bce"], tmp_path, start=first)
    # seed 1's original starts at RL from seed 0's SFT; its variant from seed 1's original
    shared = sorted(evidence.SHARED_STAGES)
    assert _FakeDemo.runs == [
        ("seed0", "original", config.seed, []),
        ("seed0", "bce", config.seed, shared),
        ("seed1", "original", config.seed + 1, shared),
        ("seed1", "bce", config.seed + 1, shared),
    ]
    seed1 = tmp_path / "seed1"
    for run in ("original", "bce"):
        assert (seed1 / run / "sft").resolve() == (first / "sft").resolve()
    marker = json.loads((seed1 / "original" / "stages" / "sft.json").read_text())
    assert marker == {"by": str(first)}
