"""msjax-score / msjax.scoring against a plain torch computation of REFERENCE sections 1-2.

The reference below is written independently of msjax: transformers' hidden_states[-2], the head
as the original nn.Sequential, and the inference step rules coded as a python loop.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_hf import build_hf, write_tokenizer  # noqa: E402

from msjax.cli import score as score_cli  # noqa: E402
from msjax.hf import load_hf  # noqa: E402
from msjax.scoring import bucket_length, score_texts  # noqa: E402
from msjax.sharding import make_mesh  # noqa: E402
from msjax.tokenizer import Tokenizer  # noqa: E402

S = ".\n\n"
TEXTS = [
    # runs of delimiters, a step after </think> (outside the span)
    f"q <think> a b{S} c{S}{S} d{S} e </think> f{S} g",
    # a delimiter right after <think>
    f"<think>{S} a{S} b </think>",
    # a delimiter before <think> (outside), no </think>: the span runs to the end
    f"x{S} y <think> z{S} w{S}",
    # two <think> tags: the span starts at the text start; the step after </think> is outside
    f"<think> a{S} <think> b{S} </think> c{S}",
    # no step at all
    "a b c",
    # long text: another length bucket
    "<think> " + f"a b{S} c d{S}{S} " * 8 + "</think> e",
    # empty text
    "",
    # two </think> tags: the span runs to the end
    f"<think> a{S} </think> b{S} </think> c{S} d",
    # a delimiter as the very first token (nothing before it to score)
    f"{S} a{S} b",
]


def reference(model, head, ids, step_id, think_start, think_end):
    """REFERENCE sections 1-2, inference rule, in plain python + torch."""
    n = len(ids)
    if n == 0:
        return 0.0, [], []
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2][0]
    lo = ids.index(think_start) if ids.count(think_start) == 1 else 0
    hi = ids.index(think_end) if ids.count(think_end) == 1 else n
    positions = []
    for j in range(1, n):
        first_of_run = ids[j] == step_id and ids[j - 1] != step_id
        if first_of_run and ids[j - 1] != think_start and lo < j - 1 < hi:
            positions.append(j - 1)
    if not positions:
        return 0.0, [], []
    with torch.no_grad():
        scores = torch.sigmoid(head(h[positions]).squeeze(-1)).tolist()
    value = math.exp(sum(math.log(max(s, 1e-10)) for s in scores) / len(scores))
    return value, scores, positions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    torch_model, head = build_hf(path, hidden=32, heads=4, kv_heads=2, intermediate=64, seed=11)
    write_tokenizer(path)
    tok = Tokenizer.from_dir(path)
    model, _ = load_hf(path)
    return path, torch_model, head, tok, model


def test_tokenizer_sees_the_step_and_think_tokens(setup):
    tok = setup[3]
    ids = tok.encode(TEXTS[0])
    assert ids.count(tok.step_ids[0]) == 5 and len(ids) == 15
    assert tok.think_start_id is not None and tok.think_end_id is not None


def test_score_texts_equal_the_torch_reference(setup):
    _, torch_model, head, tok, model = setup
    got = score_texts(model, tok, TEXTS, batch_size=3)
    counted = 0
    for text, row in zip(TEXTS, got, strict=True):
        ids = tok.encode(text)
        value, scores, positions = reference(
            torch_model, head, ids, tok.step_ids[0], tok.think_start_id, tok.think_end_id
        )
        assert row["step_positions"] == positions, text
        np.testing.assert_allclose(row["step_scores"], scores, atol=1e-5, rtol=0)
        assert row["value"] == pytest.approx(value, abs=1e-5)
        counted += len(positions)
    # the edge cases above really exercise the rules
    assert [len(r["step_positions"]) for r in got] == [3, 1, 2, 2, 0, 16, 0, 3, 1]
    assert got[0]["step_positions"] == [3, 5, 8] and 0.0 < got[0]["value"] < 1.0
    assert counted == 28 and len({round(s, 3) for r in got for s in r["step_scores"]}) > 10


def test_batch_size_and_order_do_not_change_scores(setup):
    _, _, _, tok, model = setup
    a = score_texts(model, tok, TEXTS, batch_size=3)
    b = score_texts(model, tok, TEXTS[::-1], batch_size=8)[::-1]
    for x, y in zip(a, b, strict=True):
        assert x["step_positions"] == y["step_positions"]
        np.testing.assert_allclose(x["step_scores"], y["step_scores"], atol=1e-6)


def test_sharded_model_scores_like_one_device(setup):
    path, _, _, tok, model = setup
    sharded, _ = load_hf(path, mesh=make_mesh((2, 2, 2)))
    a = score_texts(model, tok, TEXTS[:4], batch_size=3)
    b = score_texts(sharded, tok, TEXTS[:4], batch_size=3)  # rows rounded up to 4 (data x fsdp)
    for x, y in zip(a, b, strict=True):
        assert x["step_positions"] == y["step_positions"]
        np.testing.assert_allclose(x["step_scores"], y["step_scores"], atol=1e-5)


def test_bucket_lengths():
    assert [bucket_length(n) for n in (0, 1, 16, 17, 100, 2048, 2049, 5000)] == [
        16,
        16,
        16,
        32,
        128,
        2048,
        4096,
        6144,
    ]


def _run(argv):
    flags.FLAGS.unparse_flags()
    score_cli.main(flags.FLAGS(["msjax-score", *argv]))


def test_cli_rows_malformed_rows_and_atomic_output(setup, tmp_path):
    path, _, _, tok, model = setup
    rows = [
        json.dumps({"text": TEXTS[0]}),
        "not json",
        json.dumps({"prompt": "q <think> a b", "response": f"{S} c{S}{S} d{S} e </think> f{S} g"}),
        "",
        json.dumps({"foo": 1}),
        json.dumps({"text": 3}),
        json.dumps([1, 2]),
        json.dumps({"text": TEXTS[4]}),
        '{"text": "\xff not UTF-8"}',
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes("\n".join(rows).replace("\xff", "@").encode().replace(b"@", b"\xff") + b"\n")
    out = tmp_path / "out.jsonl"
    _run(["--model", str(path), "--input", str(src), "--output", str(out), "--batch_size", "2"])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 8  # one per non-blank input line
    expected = score_texts(model, tok, [TEXTS[0], TEXTS[4]])
    for i, ref in ((0, expected[0]), (2, expected[0]), (6, expected[1])):
        assert set(got[i]) == {"value", "step_scores", "step_positions"}
        assert got[i]["step_positions"] == ref["step_positions"]
        assert got[i]["value"] == pytest.approx(ref["value"], abs=1e-6)
    for i, line in ((1, 2), (3, 5), (4, 6), (5, 7), (7, 9)):
        assert got[i]["value"] is None and got[i]["step_scores"] is None
        assert got[i]["error"].startswith(f"line {line}: ")
    assert "not valid JSON" in got[1]["error"] and "'text' must be a string" in got[4]["error"]
    assert "not UTF-8" in got[7]["error"]  # a counted skip; the rest of the file was scored
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]


def test_cli_requires_a_tokenizer(setup, tmp_path):
    import shutil

    from absl import app

    model_dir = Path(shutil.copytree(setup[0], tmp_path / "m"))
    (model_dir / "tokenizer.json").unlink()
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(app.UsageError, match="no tokenizer.json"):
        _run(["--model", str(model_dir), "--input", str(tmp_path / "in.jsonl"), "--output", "x"])


def test_console_script_end_to_end(setup, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": TEXTS[3]}) + "\n")
    out = tmp_path / "out.jsonl"
    exe = Path(sys.executable).parent / "msjax-score"
    cmd = [str(exe), f"--model={setup[0]}", f"--input={src}", f"--output={out}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "scored 1 of 1 rows" in proc.stdout
    row = json.loads(out.read_text())
    ref = score_texts(setup[4], setup[3], [TEXTS[3]])[0]
    assert row["step_positions"] == ref["step_positions"] and row["step_positions"] == [1, 4]
    assert row["value"] == pytest.approx(ref["value"], abs=1e-6)


def test_untrained_head_is_refused_unless_allowed(setup, tmp_path, caplog, monkeypatch):
    """A folder without score_module.pt, and an msjax checkpoint imported from one (msjax.json
    records head "fresh"), are refused; --allow_untrained_head runs them."""
    import shutil

    from absl import app

    from msjax import checkpoint

    headless = Path(shutil.copytree(setup[0], tmp_path / "headless"))
    (headless / "score_module.pt").unlink()
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    argv = ["--input", str(src), "--output", str(out)]
    with pytest.raises(app.UsageError, match="no trained SPRM head.*--allow_untrained_head"):
        _run(["--model", str(headless), *argv])
    assert not out.exists()
    _run(["--model", str(headless), *argv, "--allow_untrained_head"])
    assert json.loads(out.read_text())["value"] is not None

    assert checkpoint.head_origin(setup[0]) == "imported"
    ckpt = tmp_path / "ckpt"
    with caplog.at_level("WARNING"):
        checkpoint.import_hf(headless, ckpt)
        assert checkpoint.head_origin(ckpt) == "fresh"
        checkpoint.load_any(ckpt)  # as the trainer loads its start policy
    assert "freshly initialised" in caplog.text and "training starts it from scratch" in caplog.text
    with pytest.raises(ValueError, match="no trained SPRM head"):
        checkpoint.require_trained_head(ckpt)
    assert checkpoint.require_trained_head(ckpt, allow_untrained=True) == "fresh"
    # The policy only, the random head never written (not even to a temporary folder).
    import msjax.hf.export

    def no_head(*args):
        raise AssertionError("an untrained head was written")

    monkeypatch.setattr(msjax.hf.export, "write_score_module", no_head)
    checkpoint.export_hf(ckpt, tmp_path / "exported")
    assert checkpoint.head_origin(tmp_path / "exported") == "fresh"
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_lang_zh_selects_the_chinese_step_mode(setup, tmp_path, monkeypatch):
    seen = []
    real = Tokenizer.from_dir
    monkeypatch.setattr(
        score_cli.Tokenizer, "from_dir", lambda path, **kw: seen.append(kw) or real(path, **kw)
    )
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    _run(["--model", str(setup[0]), "--input", str(src), "--output", str(out), "--lang", "zh"])
    assert seen == [{"step_mode": "chinese"}] and out.exists()
