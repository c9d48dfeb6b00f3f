"""Logit and hidden-state parity with transformers (torch, CPU) on random tiny Qwen2 models.

Each case is a transformers model built from a config, saved with save_pretrained and loaded by
msjax.hf.load_hf. fp32: max |logit diff| <= 1e-4 and penultimate == hidden_states[-2] within 1e-4.
bf16 (parameters and compute in bfloat16, against the fp32 torch reference): documented tolerance
max |diff| <= 0.05 * max |logit| (bf16 keeps 8 significant bits; measured 1.2% and 2.4% of
max |logit| on the two bf16 cases, whose random weights give O(1) activations in every layer).
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_hf import build_hf, msjax_forward, to_v4_layout  # noqa: E402

from msjax.hf import load_hf  # noqa: E402

CASES = {
    # name: build_hf arguments
    "tied_mha": dict(hidden=32, heads=4, kv_heads=4, layers=2, tied=True),
    "gqa2_theta1e6": dict(hidden=32, heads=4, kv_heads=2, layers=3, rope_theta=1e6),
    "gqa5_hidden40": dict(
        hidden=40, heads=5, kv_heads=1, layers=3, rope_theta=5e5, rms_norm_eps=1e-5
    ),
    "gqa4_tied_linear_rope": dict(
        hidden=48, heads=8, kv_heads=2, layers=2, tied=True, rope_linear=2.0
    ),
    "one_layer": dict(hidden=24, heads=2, kv_heads=1, layers=1, intermediate=40),
}
BF16_CASES = ("gqa2_theta1e6", "gqa4_tied_linear_rope")
# One batch serves every check: row 0 is unpadded, rows 1 and 2 are left-padded.
LENGTHS = np.array([13, 8, 3])
TOKENS = np.random.RandomState(0).randint(0, 64, (3, 13)).astype(np.int32)
VALID = np.arange(13)[None, :] >= (13 - LENGTHS)[:, None]
POSITIONS = np.maximum(np.cumsum(VALID, axis=1) - 1, 0).astype(np.int32)


def _torch(model, tokens, mask=None, positions=None):
    with torch.no_grad():
        out = model(
            torch.tensor(tokens, dtype=torch.long),
            attention_mask=None if mask is None else torch.tensor(mask, dtype=torch.long),
            position_ids=None if positions is None else torch.tensor(positions, dtype=torch.long),
            output_hidden_states=True,
        )
    return out.logits.numpy(), out.hidden_states[-2].numpy()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, HF folder, torch reference on the padded batch, each row run alone unpadded)."""
    path = tmp_path_factory.mktemp(request.param)
    model, _ = build_hf(path, **CASES[request.param])
    padded = _torch(model, TOKENS, VALID, POSITIONS)
    alone = [_torch(model, TOKENS[r : r + 1, 13 - n :]) for r, n in enumerate(LENGTHS)]
    return request.param, path, padded, alone


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
def test_fp32_logits_and_penultimate_match(case, layout, tmp_path):
    name, path, (ref_logits, ref_penult), alone = case
    if layout == "transformers4":
        path = Path(shutil.copytree(path, tmp_path / "v4"))
        d = to_v4_layout(path)
        assert "rope_parameters" not in d and "rope_theta" in d and "torch_dtype" in d
    ours, cfg = load_hf(path)
    assert cfg.num_kv_heads == CASES[name]["kv_heads"]
    logits, penult = msjax_forward(ours, TOKENS, POSITIONS, VALID)
    assert np.abs(ref_logits[0]).max() > 1.0  # random weights give non-trivial logits
    # left-padded batch with attention mask and position ids: every real position
    assert np.abs(logits - ref_logits)[VALID].max() <= 1e-4
    assert np.abs(penult - ref_penult)[VALID].max() <= 1e-4
    # each row equals the same text run alone without padding (row 0 has none)
    for r, n in enumerate(LENGTHS):
        assert np.abs(logits[r, 13 - n :] - alone[r][0][0]).max() <= 1e-4
        assert np.abs(penult[r, 13 - n :] - alone[r][1][0]).max() <= 1e-4


@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_within_documented_tolerance(name, tmp_path):
    model, _ = build_hf(tmp_path, **CASES[name])
    ref_logits, _ = _torch(model, TOKENS, VALID, POSITIONS)
    ours, cfg = load_hf(tmp_path, dtype="bfloat16")
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    logits, _ = msjax_forward(ours, TOKENS, POSITIONS, VALID)
    assert logits.dtype == np.float32
    err = np.abs(logits - ref_logits)[VALID].max()
    assert 0 < err <= 0.05 * np.abs(ref_logits[VALID]).max()
