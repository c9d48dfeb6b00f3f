"""msjax.aot.plan on the tiny recipe for a small TPU slice (compile-only devices from libtpu)."""

import pytest

from experiments.configs.tiny import get_config
from msjax.aot import plan
from msjax.topology import GIB


@pytest.fixture(scope="module")
def report():
    return plan(get_config(), "v5e-4", config_name="tiny.py", step_time=2.0)


def test_tiny_recipe_fits_a_v5e_4(report):
    assert report.fits() and report.problems() == []
    assert report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert [p.name for p in report.programs] == ["train_step", "ref_logprobs", "prefill", "decode"]
    # tiny: 4 prompts x 4 samples, mini-batch 2 prompts, micro-batch 4 rows, 64 + 48 tokens.
    calls = {p.name: (p.calls, p.tokens) for p in report.programs}
    assert calls == {
        "train_step": (2, 8 * 112),
        "ref_logprobs": (4, 8 * 112),  # old + reference log-probs of each mini-batch
        "prefill": (1, 4 * 64),
        "decode": (1, 16 * 48),
    }
    for p in report.programs:
        assert p.error is None and 0 < p.total_bytes < GIB
    assert report.to_dict()["decode_gathered_param_bytes_per_token"] == 0
    text = report.format()
    assert "tiny.py on v5e-4 = v5e:2x2: 4 devices (16.00 GiB, 197 TFLOP/s bf16 each)" in text
    assert "fits: the largest program" in text


def test_memory_counts_the_state_and_what_stays_resident(report):
    p = report.num_params
    train, ref, _, decode = report.programs
    # The train step's arguments hold params + two Adam moments (f32) over 4 devices, at least.
    assert train.argument_bytes >= 3 * 4 * p / 4
    assert train.alias_bytes >= 3 * 4 * p / 4 * 0.9  # the donated state comes back in place
    # The sampler's decode copy of the weights, replicated over the 4 fsdp devices: the backbone
    # in bf16 but its norm scales and the SPRM head (2C^2 + 4C + 1 parameters) in f32.
    m = get_config().model
    f32 = 2 * m.hidden_size**2 + 4 * m.hidden_size + 1 + (2 * m.num_layers + 1) * m.hidden_size
    copy = decode.loop.weight_bytes
    assert copy == 2 * (p - f32) + 4 * f32
    # Beside the train step: the frozen reference params and the decode copy; beside the
    # sampler (which takes the copy): the train state and the reference params; beside the
    # reference forward: the train state and the decode copy.
    ref_params = train.resident_bytes - copy
    assert 4 * p / 4 <= ref_params <= 4 * p / 4 * 1.1
    state = decode.resident_bytes - ref_params
    assert 3 * 4 * p / 4 <= state <= 3 * 4 * p / 4 * 1.1
    assert ref.resident_bytes == state + copy


def test_flops_multiply_every_loop(report):
    cfg = get_config().model
    c, h, kv, m, v = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    d = c // h
    train, _, _, decode = report.programs
    # Decode, by hand: 47 loop trips (the prefill samples token 1 of 48) x 16 rows, each a
    # one-token forward over a 112-slot cache, the LM head and the SPRM head.
    layer = 2 * (c * d * (h + 2 * kv) + h * d * c + 3 * c * m) + 2 * 2 * 112 * h * d
    token = cfg.num_layers * layer + 2 * c * v + 2 * (c * 2 * c + 2 * c)
    assert decode.flops == 47 * 16 * token
    # XLA's own count sees one trip of each loop: far less than what runs on a device.
    assert decode.compiler_flops < decode.flops / 4 / 10
    # Train step: at least 6 FLOPs per parameter and token; remat/recompute only add.
    assert 6 * report.num_params * train.tokens * 0.5 < train.model_flops <= train.flops
    assert train.flops < 2 * train.model_flops
    assert report.rl_step_flops() == sum(p.flops * p.calls for p in report.programs)


def test_mfu_from_a_step_time(report):
    train = report.programs[0]
    assert report.mfu() == pytest.approx(train.model_flops / (2.0 * 4 * 197e12))
    assert "train_step at 2 s: MFU" in report.format()


def test_bad_inputs_fail_before_compiling():
    with pytest.raises(ValueError, match="Unknown program"):
        plan(get_config(), "v5e-4", programs=("train_step", "sampler"))
    with pytest.raises(ValueError, match="Unknown topology 'v9-8'"):
        plan(get_config(), "v9-8")
    c = get_config()
    c.mesh.update(fsdp=1, tensor=4)  # tiny has 2 KV heads: 4-way tensor parallelism fails
    with pytest.raises(ValueError, match="does not divide"):
        plan(c, "v5e-4")


def test_the_model_comes_from_config_init_when_set(tmp_path):
    """With --config.init, the planner compiles that checkpoint's architecture (msjax.json
    only: no weights are read), with the recipe's runtime overrides applied."""
    import json

    from msjax import checkpoint as ckpt
    from msjax.aot import _model_config
    from msjax.models import ModelConfig

    saved = ModelConfig(
        vocab_size=256, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
        num_kv_heads=1,
    )  # fmt: skip
    meta = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION}
    meta["model_config"] = saved.to_dict()
    (tmp_path / ckpt.META_NAME).write_text(json.dumps(meta))
    c = get_config()
    c.init = str(tmp_path)
    c.model_overrides.update(remat="full", dtype="bfloat16")
    cfg = _model_config(c)
    assert cfg == saved.replace(remat="full", dtype="bfloat16", param_dtype="bfloat16")
    c.init = ""
    assert _model_config(c).hidden_size == get_config().model.hidden_size
