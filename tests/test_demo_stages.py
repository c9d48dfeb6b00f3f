"""The demo's stage loop without running any stage: config.stop_after, fresh and resumed."""

from experiments import demo
from experiments.configs import demo as demo_config


def test_stop_after_holds_for_a_resumed_run(tmp_path, monkeypatch):
    ran = []
    for stage in demo.STAGES:
        monkeypatch.setattr(
            demo.Demo, f"stage_{stage}", lambda self, stage=stage: ran.append(stage) or {}
        )
    c = demo_config.get_config("micro")
    c.out_dir, c.stop_after = str(tmp_path), "sft"
    assert demo.Demo(c).run() == {} and ran == ["data", "sft"]
    assert demo.Demo(c).run() == {} and ran == ["data", "sft"]  # resumed: stops at sft again
    c.stop_after = "rl"
    demo.Demo(c).run()
    assert ran == ["data", "sft", "eval_before", "rl"]
