"""msjax-convert import/export through main(argv), as the console script runs it."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from absl import app, flags
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_hf import build_hf, write_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from msjax import checkpoint as ck  # noqa: E402
from msjax.cli import convert, score  # noqa: E402


def _run(module, argv):
    flags.FLAGS.unparse_flags()
    module.main(flags.FLAGS(["prog", *argv]))


def _weights(folder):
    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out |= load_file(str(f))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    hf = root / "hf"
    torch_model, head = build_hf(hf, hidden=32, heads=4, kv_heads=2, intermediate=64, seed=21)
    write_tokenizer(hf)
    _run(convert, ["import", "--hf", str(hf), "--out", str(root / "ck")])
    return root, torch_model, head


def test_import_writes_a_checkpoint_with_tokenizer(converted):
    root = converted[0]
    assert ck.is_checkpoint_dir(root / "ck") and ck.latest_step(root / "ck") == 0
    assert ck.tokenizer_dir(root / "ck") == root / "ck" / "tokenizer"
    assert ck.read_config(root / "ck").param_dtype == "float32"  # the source dtype ("auto")


def test_export_round_trip_sharded_with_dash_flag(converted):
    root, torch_model, head = converted
    out = root / "out"
    _run(
        convert,
        ["export", "--checkpoint", str(root / "ck"), "--out", str(out), "--shard-size", "20KB"],
    )
    assert (out / "model.safetensors.index.json").is_file()
    a, b = _weights(root / "hf"), _weights(out)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (out / "tokenizer.json").is_file()
    state = torch.load(out / "score_module.pt", weights_only=True)
    for k, v in head.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        ref = torch_model(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_export_bf16(converted):
    root = converted[0]
    out = root / "bf16"
    _run(
        convert,
        ["export", "--checkpoint", str(root / "ck"), "--out", str(out), "--dtype", "bfloat16"],
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {str(v.dtype) for v in _weights(out).values()} == {"bfloat16"}


def test_score_cli_reads_the_msjax_checkpoint_like_the_hf_folder(converted, tmp_path):
    root = converted[0]
    text = ".\n\n a b.\n\n c <think> d.\n\n e.\n\n </think>"
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": text}) + "\n")
    rows = []
    for model in (root / "hf", root / "ck"):
        out = tmp_path / f"{model.name}.jsonl"
        _run(
            score,
            ["--model", str(model), "--input", str(tmp_path / "in.jsonl"), "--output", str(out)],
        )
        rows.append(json.loads(out.read_text()))
    assert rows[0] == rows[1] and rows[0]["step_positions"] == [6, 8]


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "usage: msjax-convert"),
        (["convert"], "usage: msjax-convert"),
        (["import", "--out", "x"], "import needs --hf and --out"),
        (["export", "--out", "x"], "export needs --checkpoint and --out"),
        (["export", "--checkpoint", "c", "--out", "x", "--dtype", "auto"], "float32 or bfloat16"),
    ],
)
def test_usage_errors(argv, match):
    with pytest.raises(app.UsageError, match=match):
        _run(convert, argv)


def test_import_of_a_bad_folder_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        _run(convert, ["import", "--hf", str(tmp_path), "--out", str(tmp_path / "ck")])
    assert not (tmp_path / "ck").exists()
