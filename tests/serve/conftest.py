"""The tiny reflective model the serving tests start `msjax-serve` on (one server per module:
the `server` fixture)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_hf import build_hf  # noqa: E402

from msjax.serve.process import ServerProcess  # noqa: E402

SPECIAL = ["<pad>", "<eos>", "<think>", "</think>", ".\n\n"]
WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB = 32  # small, so that a random model writes ".\n\n" (steps) and <eos> often


def write_tokenizer(path: Path) -> None:
    """Word-level; ".\\n\\n" and the think tags are single (added) tokens; every id decodes."""
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Only <eos> is special (skipped in response texts), so a response text re-encodes to the
    # tokens generated before the EOS.
    tok.add_special_tokens([AddedToken("<eos>", normalized=False)])
    added = ("<pad>", "<think>", "</think>", ".\n\n")
    tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    assert len(vocab) == VOCAB


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """HF folder: random Qwen2 (context 256) + score_module.pt + tokenizer files."""
    path = tmp_path_factory.mktemp("serve_hf")
    build_hf(path, hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=VOCAB, seed=5)
    write_tokenizer(path)
    return path


# Every server the tests start has these flags: the programs the first one compiled come from the
# persistent compilation cache (tests/conftest.py) for the next.
SERVER_FLAGS = ("--max_batch_rows=8", "--max_response_num=8", "--warmup_max_tokens=16")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """A warm ServerProcess on the tiny model with SERVER_FLAGS, one per module; at the end of the
    module it is stopped with SIGTERM and must exit by itself, cleanly (uvicorn re-raises SIGTERM
    once done)."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    server = ServerProcess(tiny_model, *SERVER_FLAGS, log=log)
    yield server
    code = server.stop()
    log = server.log_tail(100_000)
    assert code == -signal.SIGTERM and "Application shutdown complete" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
