"""msjax-aot's decode analysis, compiled for a TPU topology (libtpu's compile-only v5e-4 devices):
the decode program on the decode copy of the weights gathers no parameter anywhere, while the
same program on the training (FSDP) parameters gathers every weight matrix on every token (the
TPU compiler keeps those gathers in the loop; XLA:CPU would hoist them, so only a TPU compile
shows it). Memory, HBM bytes and the roofline are checked against hand counts."""

import pytest

from experiments.configs.tiny import get_config
from msjax.aot import SAMPLER_LAYOUTS, plan
from msjax.rl.config import model_config

# tiny with 3 layers (a scanned stack of 2: a nested loop in the decode step), on a v5e-4 as
# data x fsdp x tensor = 1 x 2 x 2: both FSDP gathers and tensor-parallel reductions exist.
F, T = 2, 2
ROWS, SLOTS = 16, 64 + 48  # 4 prompts x 4 samples; prompt bucket + max_new_tokens


def config():
    c = get_config()
    c.model.update(num_layers=3)
    c.mesh.update(fsdp=F, tensor=T)
    return c


@pytest.fixture(scope="module")
def loops():
    """{layout: (report, decode ProgramReport)} for the decode and the training layout."""
    out = {}
    for layout in SAMPLER_LAYOUTS:
        report = plan(config(), "v5e-4", programs=("prefill", "decode"), sampler_layout=layout)
        out[layout] = report, report.programs[1]
    return out


def matrix_elements(m) -> int:
    """Elements of the weight matrices (those with an embed axis; tied embeddings)."""
    c, d, per_layer = m.hidden_size, m.head_dim, 0
    per_layer = c * d * (m.num_heads + 2 * m.num_kv_heads) + m.num_heads * d * c
    per_layer += 3 * c * m.intermediate_size
    return m.vocab_size * c + m.num_layers * per_layer + c * 2 * c  # + the SPRM head's w1


def test_decode_layout_gathers_no_parameter_anywhere(loops):
    report, decode = loops["decode"]
    loop = decode.loop
    assert decode.error is None and loop is not None
    assert loop.gathered_param_bytes == 0 and loop.program_param_gathers == 0
    assert report.to_dict()["decode_gathered_param_bytes_per_token"] == 0
    # Tensor parallelism reduces partial sums in every layer (the analysis sees the loop's
    # collectives, nested layer loop included); what is gathered is small (sampled tokens).
    assert loop.collective_count["all-reduce"] >= 3 and loop.unknown_trips == 0
    assert loop.collective_bytes["all-gather"] <= ROWS * 384 * 4
    assert "parameters gathered 0.00 MiB" in report.format()


def test_training_layout_gathers_every_weight_matrix_each_step(loops):
    report, decode = loops["train"]
    m = model_config(config())
    # Each chip receives the other fsdp shard of its tensor shard of every matrix, at least
    # once per step, in bf16 (2 bytes, converted before the gather) or f32 (4 bytes).
    per_chip = matrix_elements(m) // T * (F - 1) / F
    assert 2 * per_chip <= decode.loop.gathered_param_bytes <= 4 * per_chip
    assert decode.loop.program_param_gathers > 0
    assert report.to_dict()["decode_gathered_param_bytes_per_token"] > 0


def test_memory_and_roofline_by_hand(loops):
    m = model_config(config())
    c, d, mlp, h, kv = m.hidden_size, m.head_dim, m.intermediate_size, m.num_heads, m.num_kv_heads
    # Decode copy per chip: backbone in bf16 split over tensor; norm scales (replicated) and the
    # head in f32.
    layer = (c * d * (h + 2 * kv) + d * (h + 2 * kv) + h * d * c + 3 * c * mlp) // T
    backbone = m.vocab_size * c // T + m.num_layers * layer
    f32 = (2 * c * c + 2 * c + 2 * c) // T + 1 + (2 * m.num_layers + 1) * c
    weights = 2 * backbone + 4 * f32
    kv_bytes = 2 * m.num_layers * ROWS // F * SLOTS * kv // T * d * 4  # f32 compute dtype
    _, decode = loops["decode"]
    loop = decode.loop
    assert (loop.weight_bytes, loop.kv_bytes, loop.rows, loop.devices) == (
        weights, kv_bytes, ROWS, 4
    )  # fmt: skip
    assert loop.live_kv_bytes == int(kv_bytes * (64 + 24) / SLOTS)
    assert loop.hbm_bytes_per_step == weights + kv_bytes
    assert loop.tokens_per_s_per_chip() == pytest.approx(ROWS * 819e9 / (weights + kv_bytes) / 4)
    # The sampler takes the decode copy as an argument and the whole training state stays
    # resident beside it: the f32 training parameters (split over fsdp and tensor) are resident
    # in the decode layout and an argument in the training layout.
    train_params = matrix_elements(m) // (F * T) + m.num_layers * (d * (h + 2 * kv) // T)
    train_params += 2 * (2 * c) // T + 1 + (2 * m.num_layers + 1) * c  # head b1, w2, b2; norms
    _, trained = loops["train"]
    assert decode.resident_bytes - trained.resident_bytes == 4 * train_params
