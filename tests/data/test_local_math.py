"""local_math: validation, de-duplication, counted skips with a summary, clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msjax.data.local_math import (
    RowError,
    build_local_math,
    normalize_row,
    read_math_files,
    read_rows,
)
from msjax.data.sources import load_source


def _jsonl(path, rows):
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n")


@pytest.fixture
def manual_dir(tmp_path):
    d = tmp_path / "manual"
    d.mkdir()
    _jsonl(
        d / "deepscaler.jsonl",
        [
            {"problem": "What is 1+1?", "answer": "2", "solution": "ignored"},
            {"problem": "What is  1+1? ", "answer": "2"},  # duplicate (whitespace)
            {"problem": "WHAT IS 1+1?", "answer": "3"},  # duplicate (case)
            {"problem": "Find x.", "answer": ""},  # no answer
            {"problem": "   ", "answer": "4"},  # empty problem
            {"answer": "4"},  # no problem at all
            b'{"problem": "bad \xff bytes", "answer": "1"}\n',  # invalid UTF-8
            b"{not json\n",  # bad JSON
            b"[1, 2]\n",  # not an object
            {"problem": "x" * 300, "answer": "1"},  # too long
            {"problem": "Long answer?", "answer": "9" * 40},  # answer too long
            {"problem": "Two problems", "question": "differ", "answer": "1"},  # ambiguous
            {"problem": "A list?", "answer": [1, 2]},  # bad field
            {"Problem": "AIME style", "Answer": 204},  # capitalised keys, integer answer
            {"question": "GSM8K style", "answer": "2 + 3 = 5 apples\n#### 5"},
            {"problem": "MATH style", "solution": "So $x = \\boxed{\\frac{1}{2}}$."},
            {"problem": "No answer anywhere", "solution": "just words"},  # no answer
            {"problem": "Same key twice", "question": "Same key twice", "final_answer": 1.5},
        ],
    )
    (d / "test").mkdir()
    table = pa.table({"problem": ["Held out 1", "Held out 2", ""], "answer": ["7", None, "1"]})
    pq.write_table(table, d / "test" / "aime.parquet")
    (d / "notes.txt").write_text("ignored: not a data file")
    return d


TRAIN_KEPT = {
    "What is 1+1?": "2",
    "AIME style": "204",
    "GSM8K style": "5",
    "MATH style": "\\frac{1}{2}",
    "Same key twice": "1.5",
}
TRAIN_SKIPPED = {
    "duplicate": 2,
    "no_answer": 2,
    "empty_problem": 2,
    "invalid_utf8": 1,
    "bad_json": 2,
    "too_long": 2,
    "ambiguous": 1,
    "bad_field": 1,
}


def test_read_counts_every_skip(manual_dir):
    splits, summary = read_math_files(manual_dir, max_problem_chars=200, max_answer_chars=32)
    assert {r["problem"]: r["answer"] for r in splits["train"]} == TRAIN_KEPT
    assert [(r["problem"], r["answer"]) for r in splits["test"]] == [("Held out 1", "7")]
    assert dict(summary.skipped["train"]) == TRAIN_SKIPPED
    assert dict(summary.skipped["test"]) == {"no_answer": 1, "empty_problem": 1}
    assert summary.rows == {"train": 18, "test": 3}
    assert summary.kept == {"train": 5, "test": 1}
    assert summary.files == ["deepscaler.jsonl", "test/aime.parquet"]
    text = str(summary)
    assert "train: 18 rows, 5 kept, 13 skipped" in text and "'duplicate': 2" in text
    assert splits["train"][0]["origin"] == "deepscaler.jsonl:1"
    assert {r["kind"] for r in splits["train"]} == {"problem"}


def test_build_prints_summary_and_reads_back(manual_dir, tmp_path, capsys):
    built = build_local_math(
        manual_dir, tmp_path / "data", max_problem_chars=200, max_answer_chars=32
    )
    out = capsys.readouterr().out
    assert "train: 18 rows, 5 kept, 13 skipped" in out and "test: 3 rows, 1 kept" in out
    assert built.name == "local_math/default" and dict(built.splits) == {"train": 5, "test": 1}
    assert built.metadata["summary"]["skipped"]["train"] == TRAIN_SKIPPED
    src = load_source("local_math/default", "train", tmp_path / "data")
    got = {src[i]["problem"].decode(): src[i]["answer"].decode() for i in range(len(src))}
    assert got == TRAIN_KEPT
    # Rebuilding with the same files and limits reuses the build; new files need overwrite.
    assert build_local_math(manual_dir, tmp_path / "data", max_problem_chars=200,
                            max_answer_chars=32, verbose=False) == built  # fmt: skip
    _jsonl(manual_dir / "more.jsonl", [{"problem": "New one", "answer": "1"}])
    with pytest.raises(ValueError, match="already holds"):
        build_local_math(manual_dir, tmp_path / "data", max_problem_chars=200, max_answer_chars=32)


def test_missing_or_empty_manual_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manual directory .*nowhere does not exist"):
        build_local_math(tmp_path / "nowhere", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl / .parquet / .json files"):
        read_math_files(tmp_path / "empty")
    _jsonl(tmp_path / "empty" / "bad.jsonl", [{"problem": "p"}])
    with pytest.raises(ValueError, match="no usable row"):
        read_math_files(tmp_path / "empty")
    assert not (tmp_path / "data").exists()


def test_normalize_row_rules():
    def pair(row):
        r = normalize_row(row, 99, 99)
        return r.problem, r.answer

    assert pair({"question": "q", "answer": "The total is #### 1,234"}) == ("q", "1,234")
    assert pair({"problem": "p", "answer": "\\boxed{3}"}) == ("p", "3")
    assert pair({"problem": "p", "answer": 2.0}) == ("p", "2")
    assert pair({"problem": "p", "reward_model": {"ground_truth": "7"}}) == ("p", "7")
    with pytest.raises(RowError, match="ambiguous"):
        normalize_row({"problem": "p", "answer": "1", "reward_model": {"ground_truth": "2"}}, 9, 9)
    assert normalize_row({"problem": "p"}, 99, 99, require_answer=False).answer is None


# The original work's file shapes (REFERENCE section 9), written in their exact schemas.
SUFFIX_R1 = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CEVAL_PROMPT = "以下是单项选择题。\n1+1=?\nA. 1\nB. 2\n答案："
AIME = [("Find the remainder of 2^10 by 7.", "2"), ("How many primes are below 20?", "8")]


def _verl_table(ground_truth_as_dict: bool, plain_columns: bool):
    suffix = " Let's think step by step and output the final answer within \\boxed{}."
    cols = {
        "data_source": ["aime24"] * len(AIME),
        "prompt": [[{"content": q + suffix, "role": "user"}] for q, _ in AIME],
        "ability": ["math"] * len(AIME),
        "reward_model": [
            {"style": "rule", "ground_truth": {"target": a} if ground_truth_as_dict else a}
            for _, a in AIME
        ],
        "extra_info": [{"index": i, "split": "test"} for i in range(len(AIME))],
    }
    if plain_columns:
        cols["question"] = [q for q, _ in AIME]
        cols["solution"] = [a for _, a in AIME]
    return pa.table(cols)


@pytest.fixture
def original_files(tmp_path):
    """One file of each original shape; returns {name: path}."""
    files = {
        "verl_dict.parquet": _verl_table(True, True),
        "verl_str.parquet": _verl_table(False, False),
    }
    for name, table in files.items():
        pq.write_table(table, tmp_path / name)
    _jsonl(tmp_path / "aime24.jsonl", [{"prompt": q + SUFFIX_R1, "answer": a} for q, a in AIME])
    _jsonl(tmp_path / "math.jsonl", [{"problem": q, "answer": a} for q, a in AIME])
    ceval = [{"model_input": CEVAL_PROMPT, "answer": "B"}]
    (tmp_path / "ceval.json").write_text(json.dumps(ceval, ensure_ascii=False), "utf-8")
    return {p.name: p for p in tmp_path.iterdir()}


def test_every_original_shape_is_read_with_no_skip(original_files, tmp_path):
    for name, path in original_files.items():
        splits, summary = read_math_files(files=[path])
        assert summary.skipped["train"] == {}, name
        rows = splits["train"]
        if name == "ceval.json":
            assert [(r["kind"], r["answer"]) for r in rows] == [("prompt", "B")]
            assert rows[0]["prompt"] == CEVAL_PROMPT
            continue
        assert [r["answer"] for r in rows] == [a for _, a in AIME], name
        if name.endswith(".parquet"):
            # The chat conversation is kept as it is (not the plain question column).
            assert [r["kind"] for r in rows] == ["chat", "chat"]
            messages = json.loads(rows[0]["prompt"])
            assert messages == [{"role": "user", "content": messages[0]["content"]}]
            assert messages[0]["content"].startswith(AIME[0][0] + " Let's think")
        elif name == "aime24.jsonl":
            assert [(r["kind"], r["prompt"]) for r in rows] == [
                ("prompt", q + SUFFIX_R1) for q, _ in AIME
            ]
        else:
            assert [(r["kind"], r["prompt"]) for r in rows] == [("problem", q) for q, _ in AIME]
    # Several files at once, built into a TFDS source named after the files.
    built = build_local_math(
        None, tmp_path / "data", files=",".join(map(str, original_files.values())), verbose=False
    )
    assert built.name.startswith("local_math/files_") and built.splits["train"] >= 3
    src = load_source(built.name, "train", tmp_path / "data")
    kinds = {src[i]["kind"].decode() for i in range(len(src))}
    assert kinds == {"chat", "prompt", "problem"}


def test_bad_files_and_rows_name_the_problem(tmp_path):
    pq.write_table(pa.table({"data_source": ["a"], "ability": ["math"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"cols.parquet has no prompt column .*'data_source'"):
        read_math_files(files=[tmp_path / "cols.parquet"])
    pq.write_table(pa.table({"problem": ["p"]}), tmp_path / "noanswer.parquet")
    with pytest.raises(ValueError, match=r"noanswer.parquet has no answer column"):
        read_math_files(files=[tmp_path / "noanswer.parquet"])
    assert [n for n, _ in read_rows(tmp_path / "noanswer.parquet", require_answer=False)] == [1]
    (tmp_path / "obj.json").write_text('{"model_input": "x"}')
    with pytest.raises(ValueError, match="obj.json holds a JSON dict; .* must be a list"):
        read_math_files(files=[tmp_path / "obj.json"])
    (tmp_path / "bad.json").write_bytes(b'[{"model_input": "\xff"}]')
    with pytest.raises(ValueError, match="bad.json is not a JSON file"):
        read_math_files(files=[tmp_path / "bad.json"])
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl does not exist"):
        read_math_files(files=[tmp_path / "nowhere.jsonl"])
    # A bad chat prompt or a non-UTF-8 line is a counted skip; the rest of the file is read.
    _jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": [{"role": "narrator", "content": "x"}], "answer": "1"},
            {"prompt": [{"role": "user"}], "answer": "1"},
            b'{"problem": "\xfe", "answer": "1"}\n',
            {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                "answer": "2",
            },  # fmt: skip
        ],
    )
    splits, summary = read_math_files(files=[tmp_path / "mixed.jsonl"])
    assert summary.skipped["train"] == {"bad_chat": 2, "invalid_utf8": 1}
    assert [(r["problem"], r["answer"], r["origin"]) for r in splits["train"]] == [
        ("u", "2", "mixed.jsonl:4")
    ]


def test_pipeline_renders_each_kind_with_the_chat_template(original_files, tmp_path):
    """Training prompts from the original files: the conversation as it is, the AIME prompt as
    the user message, the bare problem with the suffix; as transformers renders them."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    from msjax.data.pipeline import PromptPipeline
    from msjax.tokenizer import MATH_SUFFIX, Tokenizer

    # A byte-level tokenizer without merges: any text round-trips.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Backend(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in ("<s>", "</s>")])
    folder = tmp_path / "tok"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": (
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}{{ bos_token }}<think>\n{% endif %}"
        ),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(folder, step_ids=[0])
    reference = AutoTokenizer.from_pretrained(folder)
    names = ["verl_str.parquet", "aime24.jsonl", "math.jsonl"]
    built = build_local_math(
        None, tmp_path / "data", files=[original_files[n] for n in names], verbose=False
    )
    src = load_source(built.name, "train", tmp_path / "data")
    pipe = PromptPipeline(
        src, tok, batch_size=len(src), max_prompt_len=256, shuffle=False, shard_index=0,
        shard_count=1, num_epochs=1,
    )  # fmt: skip
    batch = next(iter(pipe))
    got = {}
    for row, (index, length) in enumerate(zip(batch["index"], batch["prompt_lengths"])):
        got[int(src[int(index)]["id"])] = tok.decode(batch["prompt_tokens"][row, -length:])
    suffix_verl = " Let's think step by step and output the final answer within \\boxed{}."
    users = [q + suffix_verl for q, _ in AIME] + [q + SUFFIX_R1 for q, _ in AIME]
    users += [f"{q} {MATH_SUFFIX}" for q, _ in AIME]
    want = [
        reference.apply_chat_template(
            [{"role": "user", "content": u}], tokenize=False, add_generation_prompt=True
        )
        for u in users
    ]
    assert [got[i] for i in range(len(src))] == want
    # A template that fails on a row: the error names the file and row, before any batch.
    config["chat_template"] = (
        "{% if 'primes' in messages[0].content %}{{ raise_exception('x') }}{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\w\.(parquet|jsonl):2: the chat template .* failed"):
        PromptPipeline(src, Tokenizer.from_dir(folder, step_ids=[0]), batch_size=2,
                       max_prompt_len=256, shard_index=0, shard_count=1)  # fmt: skip
