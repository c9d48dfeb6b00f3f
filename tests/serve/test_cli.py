"""msjax-serve's command line refuses bad flags and untrained heads before loading anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_hf import build_hf  # noqa: E402

from msjax.cli import serve as serve_cli  # noqa: E402
from msjax.serve.backend import untrained_head  # noqa: E402


def _run(argv):
    flags.FLAGS.unparse_flags()
    serve_cli.main(flags.FLAGS(["msjax-serve", *argv]))


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    path = tmp_path_factory.mktemp("headless")
    build_hf(path, hidden=16, heads=2, kv_heads=1, intermediate=24, head=False)
    return path


def test_bad_flags(tmp_path):
    for argv, message in [
        ([], "--model is required"),
        ([f"--model={tmp_path}", "--max_batch_rows=0"], "--max_batch_rows=0 must be >= 1"),
        ([f"--model={tmp_path}", "--max_batch_rows=8", "--max_response_num=9"], "must be <="),
        ([f"--model={tmp_path}", "--port=70000"], "--port=70000"),
        (
            [f"--model={tmp_path}", "--default_repetition_penalty=0"],
            "--default_repetition_penalty=0",
        ),
        ([f"--model={tmp_path}", "--request_timeout=-1"], "--request_timeout=-1.0"),
    ]:
        with pytest.raises(app.UsageError, match=message):
            _run(argv)


def test_untrained_head_is_refused(headless, tmp_path):
    with pytest.raises(app.UsageError, match="no score_module.pt.*--allow_untrained_head"):
        _run([f"--model={headless}"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "msjax.json").write_text(json.dumps({"format": "msjax", "head": "fresh"}))
    assert "freshly initialised" in untrained_head(ckpt)
    (ckpt / "msjax.json").write_text(json.dumps({"format": "msjax", "head": "trained"}))
    assert untrained_head(ckpt) is None
