"""msjax-infer end to end on a tiny random Hugging Face folder: rows, errors, the summary, greedy
against transformers, streamed scores against msjax-score's full forward, atomic output."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from absl import app, flags
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from tiny_hf import build_hf  # noqa: E402

from msjax.cli import infer as infer_cli  # noqa: E402
from msjax.generate.infer import InferOptions, infer_file  # noqa: E402
from msjax.generate.tts import best_of_n  # noqa: E402
from msjax.hf import load_hf  # noqa: E402
from msjax.rewards.math import extract_boxed  # noqa: E402
from msjax.scoring import score_texts  # noqa: E402
from msjax.tokenizer import Tokenizer as MsTokenizer  # noqa: E402

SPECIAL = ["<pad>", "<eos>", "<think>", "</think>", ".\n\n"]
BOXED = ["\\boxed{1}", "\\boxed{2}"]
WORDS = [chr(c) for c in range(ord("a"), ord("y"))]
VOCAB = 32


def write_tokenizer(path: Path) -> None:
    """Word-level: ".\\n\\n", the think tags and two boxed answers are single tokens."""
    vocab = {t: i for i, t in enumerate(SPECIAL + BOXED + WORDS + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in ("<pad>", "<eos>")])
    added = ("<think>", "</think>", ".\n\n", *BOXED)
    tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    assert len(vocab) == VOCAB  # every model id decodes to a token


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf, _ = build_hf(path, hidden=32, heads=4, kv_heads=2, intermediate=48, vocab=VOCAB, seed=3)
    write_tokenizer(path)
    return path, hf, MsTokenizer.from_dir(path)


def _run(argv):
    flags.FLAGS.unparse_flags()
    infer_cli.main(flags.FLAGS(["msjax-infer", *argv]))


ROWS = [
    json.dumps({"problem": "a b c", "answer": "1"}),
    "{not json",
    json.dumps({"prompt": "<think> d e f", "answer": 2}),
    "",
    json.dumps({"prompt": "   "}),
    json.dumps({"foo": 1}),
    json.dumps({"prompt": "a " * 300, "answer": "1"}),
    json.dumps({"problem": "g h", "answer": "2"}),
    json.dumps({"problem": "i j k l"}),
]


def test_cli_rows_errors_summary(setup, tmp_path, capsys):
    path, _, tok = setup
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(ROWS) + "\n")
    argv = ["--model", str(path), "--input", str(src), "--output", str(out), "--k", "4"]
    argv += ["--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "24"]
    _run([*argv, "--batch_size", "3", "--seed", "3", "--template", "plain"])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in got] == [1, 2, 3, 5, 6, 7, 8, 9]  # blank line 4 ignored
    errors = {r["line"]: r["error"] for r in got if "error" in r}
    assert set(errors) == {2, 5, 6, 7}
    assert "not valid JSON" in errors[2] and "'prompt' is empty" in errors[5]
    assert "needs 'prompt' or 'problem'" in errors[6] and "exceeds the model's limit" in errors[7]
    assert all(errors[n].startswith(f"line {n}: ") for n in errors)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]

    golds = {1: "1", 3: "2", 8: "2", 9: None}
    table = {"correct": [], "scores": [], "answers": []}
    for row in (r for r in got if "error" not in r):
        cands = row["candidates"]
        assert len(cands) == 4
        scores = [c["score"] for c in cands]
        chosen = best_of_n(scores)
        assert row["response"] == cands[chosen]["response"] and row["score"] == max(scores)
        for c in cands:
            assert 1 <= len(c["tokens"]) <= 24
            assert c["response"] == tok.decode(c["tokens"], skip_special_tokens=True)
            assert c["answer"] == extract_boxed(c["response"])
            steps = np.array(c["step_scores"])
            geo = float(np.exp(np.log(np.maximum(steps, 1e-10)).mean())) if len(steps) else 0.0
            assert c["score"] == pytest.approx(geo, abs=1e-6)
            assert len(c["step_positions"]) == len(steps)
            reached_eos = c["tokens"][-1] in tok.eos_ids
            assert c["finish_reason"] == ("eos" if reached_eos else "length")
        gold = golds[row["line"]]
        if gold is None:
            assert row["correct"] is None
            continue
        flags_ = [c["answer"] == gold for c in cands]
        assert [c["correct"] for c in cands] == flags_ and row["correct"] == flags_[chosen]
        table["correct"].append(flags_)
        table["scores"].append(scores)
        table["answers"].append([c["answer"] for c in cands])
    assert any(c for row in table["answers"] for c in row), "no boxed answer was generated"
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "maj@k" in printed and "bon@k" in printed
    assert "rows 8  run 4  skipped 4  k 4" in printed
    pass1 = np.mean(table["correct"])
    assert f"{pass1:10.4f}" in printed.splitlines()[-2]


def test_streamed_scores_equal_msjax_score(setup, tmp_path):
    """The candidates' scores equal the full-forward scores of msjax-score on prompt+response."""
    path, _, tok = setup
    model, cfg = load_hf(path)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = ["<think> a b c", "d e <think> f"]
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    # The settings of test_cli_rows_errors_summary: the compiled program is shared.
    options = InferOptions(k=4, temperature=1.0, top_p=1.0, max_new_tokens=24, batch_size=3)
    infer_file(model, cfg, tok, src, out, options, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    texts, expect = [], []
    for p, row in zip(prompts, rows, strict=True):
        for c in row["candidates"]:
            ids = tok.encode(p) + c["tokens"]
            text = tok.decode(ids, skip_special_tokens=False)
            assert tok.encode(text) == ids  # the text round-trips to the same tokens
            texts.append(text)
            expect.append(c)
    scored = score_texts(model, tok, texts, batch_size=4)
    assert sum(len(c["step_scores"]) for c in expect) > 0
    for ref, c in zip(scored, expect, strict=True):
        assert c["step_positions"] == ref["step_positions"]
        np.testing.assert_allclose(c["step_scores"], ref["step_scores"], atol=1e-5)
        assert c["score"] == pytest.approx(ref["value"], abs=1e-5)


def test_greedy_k1_matches_transformers(setup, tmp_path):
    path, hf, tok = setup
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = ["a b c d e f g", "<think> h", "i j k l m a b c d"]
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    _run(
        [f"--model={path}", f"--input={src}", f"--output={out}", "--temperature=0", "--k=1"]
        + ["--max_new_tokens=20", "--batch_size=4"]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for p, row in zip(prompts, rows, strict=True):
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            ref = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=tok.eos_ids[0],
                pad_token_id=tok.pad_id,
            )[0, ids.shape[1] :].tolist()
        assert row["candidates"][0]["tokens"] == ref


def test_bad_flags_and_files(setup, tmp_path):
    path = setup[0]
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a"}\n')
    base = [f"--model={path}", f"--input={src}", f"--output={tmp_path / 'o.jsonl'}"]
    base.append("--max_new_tokens=16")
    for extra, message in [
        (["--k=0"], ">= 1"),
        (["--mode=low", "--k=3"], "not both"),
        (["--prune=bogus"], "NAME=VALUE"),
        (["--top_p=0"], "top_p"),
        (["--temperature=-1"], "temperature"),
        (["--batch_size=0"], "batch_size"),
        (["--max_new_tokens=256"], "leaves no room"),
    ]:
        with pytest.raises(app.UsageError, match=message):
            _run(base + extra)
    with pytest.raises(flags.IllegalFlagValueError):
        _run([*base, "--mode=extreme"])
    with pytest.raises(app.UsageError, match="does not exist"):
        _run([f"--model={path}", f"--input={tmp_path / 'nope.jsonl'}", "--output=x"])
    with pytest.raises(app.UsageError, match="--output is required"):
        _run([f"--model={path}", f"--input={src}"])
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_failure_leaves_no_output(setup, tmp_path):
    path, _, tok = setup
    model, cfg = load_hf(path)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "a b", "answer": "1"}) + "\n")

    class Broken:
        def verify_batch(self, responses, golds):
            raise RuntimeError("verifier down")

    options = InferOptions(k=1, temperature=0.0, max_new_tokens=20, batch_size=4)  # as greedy
    with pytest.raises(RuntimeError, match="verifier down"):
        infer_file(model, cfg, tok, src, out, options, progress=False, verifier=Broken())
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
