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
from msjax.generate.infer import InferOptions, infer_file, summary_table  # noqa: E402
from msjax.generate.tts import best_of_n  # noqa: E402
from msjax.hf import load_hf  # noqa: E402
from msjax.rewards.math import extract_boxed  # noqa: E402
from msjax.scoring import score_texts  # noqa: E402
from msjax.tokenizer import MATH_SUFFIX  # noqa: E402
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


def math_rule(response, gold):
    """The math reward restated for this vocabulary after a "plain" prompt (which opens a think
    span): only the text after the last "</think>" counts; the answer is the last run of boxes
    that only spaces join, read as a set of values."""
    if "</think>" not in response:
        return False
    run = []
    for word in reversed(response.rsplit("</think>", 1)[1].split()):
        if word in BOXED:
            run.append(word[len("\\boxed{") : -1])
        elif run:
            break
    return set(run) == {gold}


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
    assert "not valid JSON" in errors[2] and "empty_problem" in errors[5]
    assert "empty_problem" in errors[6] and "exceeds the model's limit" in errors[7]
    assert all(errors[n].startswith(f"line {n}: ") for n in errors)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]

    golds = {1: "1", 3: "2", 8: "2", 9: None}
    table = {"correct": [], "scores": [], "answers": []}
    for row in (r for r in got if "error" not in r):
        assert row["gold"] == golds[row["line"]]
        assert row["prompt"].endswith("\n<think>\n")  # every row in the "plain" template
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
        flags_ = [math_rule(c["response"], gold) for c in cands]
        assert [c["correct"] for c in cands] == flags_ and row["correct"] == flags_[chosen]
        table["correct"].append(flags_)
        table["scores"].append(scores)
        table["answers"].append([c["answer"] for c in cands])
    assert any(c for row in table["answers"] for c in row), "no boxed answer was generated"
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "maj@k" in printed and "bon@k" in printed
    assert "rows 8  run 4  skipped 4  k 4" in printed
    pass1 = np.mean(table["correct"])
    lines = printed.splitlines()
    assert (
        f"{pass1:10.4f}"
        in lines[lines.index("disjoint groups of N (first maximum score per group):") - 1]
    )
    # BoN over the 2 disjoint groups of 2 of each problem: the first maximum of each group.
    groups = [
        c[g : g + 2][int(np.argmax(s[g : g + 2]))]
        for c, s in zip(table["correct"], table["scores"], strict=True)
        for g in (0, 2)
    ]
    assert f"N= 2: BoN {np.mean(groups):.4f}" in printed


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

    def broken(prompts, responses, golds):
        raise RuntimeError("verifier down")

    options = InferOptions(k=1, temperature=0.0, max_new_tokens=20, batch_size=4)  # as greedy
    with pytest.raises(RuntimeError, match="verifier down"):
        infer_file(model, cfg, tok, src, out, options, progress=False, reward=broken)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


# ------------------------------------------------------------ the original's files and settings

CHAT = (
    "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
    "{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<think> {% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(setup, tmp_path_factory):
    """The setup folder with a chat template in its tokenizer_config.json."""
    import shutil

    path = Path(shutil.copytree(setup[0], tmp_path_factory.mktemp("chat") / "m"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT}))
    return path


def test_original_files_chat_template_gold_and_row_errors(setup, chat_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    chats = [
        [{"role": "user", "content": "a b c"}],
        [{"role": "narrator", "content": "a"}],
        [{"role": "user", "content": "boom"}],
        [{"role": "system", "content": "d"}, {"role": "user", "content": "e f"}],
    ]
    table = pa.table(
        {
            "data_source": ["aime"] * 4,
            "prompt": chats,
            "ability": ["math"] * 4,
            "reward_model": [{"style": "rule", "ground_truth": {"target": t}} for t in "1212"],
            "extra_info": [{"index": i, "split": "test"} for i in range(4)],
        }
    )
    pq.write_table(table, tmp_path / "verl.parquet")
    jsonl = tmp_path / "aime.jsonl"
    jsonl.write_bytes(
        json.dumps({"prompt": "g h\nPlease reason.", "answer": "2"}).encode()
        + b'\n{"prompt": "\xff", "answer": "1"}\n'
        + json.dumps({"problem": "i j", "answer": 1}).encode()
        + b"\n"
    )
    # C-Eval: the letter rule reads the prompt + response, so a letter in the prompt counts.
    ceval = [{"model_input": f"k l answer: {x}", "answer": "B"} for x in "Bc"]
    (tmp_path / "ceval.json").write_text(json.dumps(ceval))
    reference = AutoTokenizer.from_pretrained(chat_model)
    render = lambda messages: reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    argv = ["--k=4", "--temperature=1.0", "--top_p=1.0", "--max_new_tokens=24", "--batch_size=3"]
    expected = {
        "verl.parquet": [
            (render(chats[0]), "1", None),
            (None, None, "line 2: bad_chat: chat message 0 has the unknown role 'narrator'"),
            (None, "1", "line 3: the chat template of"),
            (render(chats[3]), "2", None),
        ],
        "aime.jsonl": [
            (render([{"role": "user", "content": "g h\nPlease reason."}]), "2", None),
            (None, None, "line 2: invalid_utf8"),
            (render([{"role": "user", "content": "i j " + MATH_SUFFIX}]), "1", None),
        ],
        "ceval.json": [
            (render([{"role": "user", "content": c["model_input"]}]), "B", None) for c in ceval
        ],
    }
    for name, want in expected.items():
        out = tmp_path / f"{name}.out.jsonl"
        _run([f"--model={chat_model}", f"--input={tmp_path / name}", f"--output={out}", *argv])
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(got) == len(want), name
        for row, (prompt, gold, error) in zip(got, want, strict=True):
            assert row["gold"] == gold
            if error is None:
                assert row["prompt"] == prompt and "error" not in row
                assert all(c["correct"] is not None for c in row["candidates"])
            else:
                assert row["error"].startswith(error) and row["candidates"] == []
    ceval_out = (tmp_path / "ceval.json.out.jsonl").read_text().splitlines()
    flags_ = [[c["correct"] for c in json.loads(r)["candidates"]] for r in ceval_out]
    assert flags_ == [[True] * 4, [False] * 4]
    assert (
        "failed to render (TemplateError: no boom)"
        in json.loads((tmp_path / "verl.parquet.out.jsonl").read_text().splitlines()[2])["error"]
    )


def test_bad_inputs_are_refused_before_writing(setup, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = setup[0]
    out = tmp_path / "out.jsonl"
    pq.write_table(pa.table({"data_source": ["a"]}), tmp_path / "cols.parquet")
    with pytest.raises(app.UsageError, match=r"cols.parquet has no prompt column"):
        _run([f"--model={path}", f"--input={tmp_path / 'cols.parquet'}", f"--output={out}"])
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n')
    base = [f"--input={tmp_path / 'in.jsonl'}", f"--output={out}"]
    with pytest.raises(app.UsageError, match="tokenizer files have none"):
        _run([f"--model={path}", *base, "--template=chat"])
    headless = Path(shutil.copytree(path, tmp_path / "headless"))
    (headless / "score_module.pt").unlink()
    with pytest.raises(app.UsageError, match="no trained SPRM head"):
        _run([f"--model={headless}", *base])
    assert not out.exists()


def test_official_preset_and_the_clamped_budget(setup):
    """--preset official sets the original's settings (explicit flags win); the 32768-token
    budget is clamped to what the model's 256 positions leave after the longest prompt."""
    from msjax.generate.infer import OFFICIAL_PRESET, read_prompts

    path, _, tok = setup
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["msjax-infer", "--preset=official"])
    options = infer_cli.options_from_flags()
    assert {k: getattr(options, k) for k in OFFICIAL_PRESET} == OFFICIAL_PRESET
    assert (options.k, options.repetition_penalty, options.reward) == (16, 1.05, "official")
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["msjax-infer", "--preset=official", "--temperature=1.0", "--mode=low"])
    options = infer_cli.options_from_flags()
    assert (options.temperature, options.k, options.top_p) == (1.0, 2, 0.95)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["msjax-infer", "--suffix=", "--manager=prime", "--max_new_tokens=7"])
    options = infer_cli.options_from_flags()  # no preset: the flags' own defaults
    assert (options.k, options.temperature, options.repetition_penalty) == (1, 0.6, 1.0)
    assert (options.reward, options.manager, options.suffix, options.max_new_tokens) == (
        "math",
        "prime",
        None,
        7,
    )
    flags.FLAGS.unparse_flags()
    # eval.py shares the flags: --k_max is its k, the preset and explicit flags as above.
    from experiments import eval as eval_script

    flags.FLAGS(["eval", "--preset=official", "--k_max=4", "--top_p=0.5"])
    options = eval_script.options_from_flags()
    assert (options.k, options.top_p, options.temperature, options.reward) == (
        4,
        0.5,
        0.6,
        "official",
    )
    assert options.clamp_max_new_tokens and options.max_new_tokens == 32768
    flags.FLAGS.unparse_flags()

    _, cfg = load_hf(path)
    src = Path(path) / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a b c", "a " * 250]))
    rows, clamped = read_prompts(src, tok, InferOptions.official(), cfg)
    longest = max(len(r["ids"]) for r in rows)
    assert longest == 250 and clamped.max_new_tokens == cfg.max_position_embeddings - longest
    rows, same = read_prompts(src, tok, InferOptions.official(clamp_max_new_tokens=False), cfg)
    assert same.max_new_tokens == 32768 and all(
        "exceeds the model's limit" in r["error"] for r in rows
    )
    src.unlink()


def test_pooled_metric_over_runs_and_files(tmp_path):
    """The original's metric: a problem's candidates pooled over files, cut into disjoint groups
    of N, the FIRST maximum score chosen per group (never a pruned one), accuracy averaged over
    groups; a problem with two gold answers is refused."""
    from msjax.generate.infer import pool_files

    def row(prompt, cands, gold="1"):
        cs = [
            {"correct": c, "score": s, "answer": a, "finish_reason": "eos" if a else "pruned"}
            for c, s, a in cands
        ]
        return {"prompt": prompt, "gold": gold, "correct": bool(cs[0]["correct"]), "candidates": cs}

    run1 = [
        row("p", [(True, 0.9, "1"), (False, 0.9, "2")]),  # tie: the first maximum is chosen
        row("q", [(False, 0.1, "3"), (True, 0.2, "4")]),
        {"line": 3, "prompt": None, "correct": None, "candidates": [], "error": "line 3: x"},
    ]
    run2 = [
        row("p", [(False, 0.5, "2"), (True, 0.4, "1")]),
        row("q", [(None, 0.9, None), (True, 0.3, "4")]),  # pruned: not chosen
    ]
    paths = []
    for i, rows in enumerate((run1, run2)):
        paths.append(tmp_path / f"run{i}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pooled = pool_files(paths)
    assert pooled["problems"] == 2 and set(pooled["groups"]) == {"2"}
    # groups of 2: p -> [T,F] picks T, [F,T] picks F; q -> [F,T] picks T, [pruned,T] picks T.
    assert pooled["groups"]["2"] == {"bon": pytest.approx(3 / 4), "groups": 2}
    printed = summary_table(pooled)
    assert "N= 2: BoN 0.7500  (2 groups per problem)" in printed
    (tmp_path / "other.jsonl").write_text(json.dumps(row("q", [(True, 0.1, "4")], gold="5")))
    with pytest.raises(app.UsageError, match="'q' has gold answer '1' in one row and '5'"):
        _run([f"--pool={paths[0]},{tmp_path / 'other.jsonl'}"])
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(app.UsageError, match="bad.jsonl line 1 is not an msjax-infer output"):
        _run([f"--pool={paths[0]},{tmp_path / 'bad.jsonl'}"])


def test_eval_script_reads_the_original_files(chat_model, tmp_path):
    """experiments/eval.py on a verl parquet with the checkpoint's chat template: the modes'
    report, and an untrained head refused."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from experiments.eval import evaluate

    chats = [[{"role": "user", "content": f"{w} b"}] for w in "acd"]
    truth = [{"style": "rule", "ground_truth": t} for t in "123"]  # ground truth as a string
    pq.write_table(pa.table({"prompt": chats, "reward_model": truth}), tmp_path / "d.parquet")
    settings = dict(max_new_tokens=24, temperature=1.0, top_p=1.0, batch_size=3)
    report = evaluate(
        str(chat_model), tmp_path / "d.parquet", tmp_path / "r.json", k_max=4, progress=False,
        **settings,
    )  # fmt: skip
    assert report["problems"] == 3 and report["skipped"] == 0 and report["modes"] == {"low": 2}
    rows = [json.loads(x) for x in (tmp_path / "r.candidates.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["1", "2", "3"]
    assert all(r["prompt"] == f"<|user|> {w} b <think> " for r, w in zip(rows, "acd"))
    headless = Path(shutil.copytree(chat_model, tmp_path / "headless"))
    (headless / "score_module.pt").unlink()
    with pytest.raises(ValueError, match="no trained SPRM head"):
        evaluate(str(headless), tmp_path / "d.parquet", tmp_path / "r2.json", k_max=4, **settings)
    evaluate(
        str(headless), tmp_path / "d.parquet", tmp_path / "r2.json", k_max=4, progress=False,
        allow_untrained_head=True, **settings,
    )  # fmt: skip
