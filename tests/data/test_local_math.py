"""local_math: validation, de-duplication, counted skips with a summary, clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msjax.data.local_math import build_local_math, normalize_row, read_math_files
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
    assert splits["train"][0]["origin"] == "deepscaler.jsonl:0"


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
    with pytest.raises(FileNotFoundError, match="no .jsonl / .parquet files"):
        read_math_files(tmp_path / "empty")
    _jsonl(tmp_path / "empty" / "bad.jsonl", [{"problem": "p"}])
    with pytest.raises(ValueError, match="no usable row"):
        read_math_files(tmp_path / "empty")
    assert not (tmp_path / "data").exists()


def test_normalize_row_rules():
    assert normalize_row({"question": "q", "answer": "The total is #### 1,234"}, 99, 99) == (
        "q",
        "1,234",
    )
    assert normalize_row({"problem": "p", "answer": "\\boxed{3}"}, 99, 99) == ("p", "3")
    assert normalize_row({"problem": "p", "answer": 2.0}, 99, 99) == ("p", "2")
