"""TFDS builder `local_math`: user math problems from JSONL / parquet files in a manual directory.

Layout: files directly in the manual directory form the "train" split; files in a subdirectory
form the split named after it (e.g. `test/aime24.jsonl` -> split "test"). Accepted row keys:
problem from "problem" / "question" (any case), answer from "answer" / "final_answer" /
"expected_answer" (any case); without an answer, the last `\\boxed{}` of "solution"; a GSM8K-style
answer ("... #### 42") keeps the part after "####"; a boxed answer keeps the boxed content.

Each row is validated; bad rows are skipped and counted by reason:
  bad_json (not a JSON object), invalid_utf8, empty_problem, no_answer, bad_field (a field that is
  not text or a number), ambiguous (two keys giving different problems or answers), too_long
  (problem or answer longer than the limit), duplicate (same problem, whitespace and case
  folded, already kept in the split).
Features: problem, answer, origin ("file:row", text), id (int64).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from msjax.data.sources import ArrayRecordBuilder, BuiltDataset, prepare, quiet
from msjax.rewards.math import extract_boxed

VERSION = tfds.core.Version("1.0.0")
SUFFIXES = (".jsonl", ".parquet")
PROBLEM_KEYS = ("problem", "question")
ANSWER_KEYS = ("answer", "final_answer", "expected_answer")
SOLUTION_KEYS = ("solution",)
SKIP_REASONS = (
    "bad_json",
    "invalid_utf8",
    "empty_problem",
    "no_answer",
    "bad_field",
    "ambiguous",
    "too_long",
    "duplicate",
)
_SPLIT_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
log = logging.getLogger(__name__)


class RowError(Exception):
    """A row skipped for `reason` (one of SKIP_REASONS)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class ReadSummary:
    """Per split: rows read, rows kept, skipped rows by reason; and the files read."""

    files: list[str] = dataclasses.field(default_factory=list)
    rows: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    kept: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    skipped: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": list(self.files),
            "rows": dict(self.rows),
            "kept": dict(self.kept),
            "skipped": {s: dict(c) for s, c in self.skipped.items()},
        }

    def __str__(self) -> str:
        lines = [f"local_math: {len(self.files)} file(s)"]
        for split in sorted(self.rows):
            skipped = dict(sorted(self.skipped.get(split, {}).items()))
            lines.append(
                f"  {split}: {self.rows[split]} rows, {self.kept[split]} kept, "
                f"{self.rows[split] - self.kept[split]} skipped {skipped}"
            )
        return "\n".join(lines)


def _text(value: Any) -> str | None:
    """A field as text (numbers as their decimal form); None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError("invalid_utf8") from e
    if isinstance(value, bool):
        raise RowError("bad_field")
    if isinstance(value, int | np.integer):
        value = str(int(value))
    elif isinstance(value, float | np.floating):
        value = str(int(value)) if float(value).is_integer() else repr(float(value))
    if not isinstance(value, str):
        raise RowError("bad_field")
    value = value.strip()
    return value or None


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    lowered = {str(k).lower(): v for k, v in row.items()}
    values = {t for k in keys if (t := _text(lowered.get(k))) is not None}
    if len(values) > 1:
        raise RowError("ambiguous")
    return next(iter(values), None)


def normalize_row(row: Any, max_problem_chars: int, max_answer_chars: int) -> tuple[str, str]:
    """A raw row -> (problem, answer); RowError(reason) when the row must be skipped."""
    if not isinstance(row, dict):
        raise RowError("bad_json")
    problem = _pick(row, PROBLEM_KEYS)
    if problem is None:
        raise RowError("empty_problem")
    answer = _pick(row, ANSWER_KEYS)
    if answer is not None and "####" in answer:
        answer = answer.rsplit("####", 1)[1].strip() or None
    elif answer is not None and ("\\boxed" in answer or "\\fbox" in answer):
        answer = extract_boxed(answer)
    if answer is None:
        solution = _pick(row, SOLUTION_KEYS)
        answer = extract_boxed(solution) if solution else None
    if not answer or not answer.strip():
        raise RowError("no_answer")
    if len(problem) > max_problem_chars or len(answer) > max_answer_chars:
        raise RowError("too_long")
    return problem, answer.strip()


def _jsonl_rows(path: Path) -> Iterator[Any]:
    """Rows of a JSONL file; RowError instances stand for unreadable lines."""
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                yield RowError("invalid_utf8")
                continue
            try:
                yield json.loads(text)
            except json.JSONDecodeError:
                yield RowError("bad_json")


def _parquet_rows(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ValueError(f"cannot read parquet file {path}: {e}; fix or remove it") from e
    yield from table.to_pylist()


def find_files(manual_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """Split name -> sorted data files (see the module docstring for the layout)."""
    root = Path(manual_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"local_math manual directory {root} does not exist: create it and put your "
            f"{' / '.join(SUFFIXES)} files of {{problem, answer}} rows in it"
        )
    files: dict[str, list[Path]] = collections.defaultdict(list)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in SUFFIXES:
            continue
        rel = path.relative_to(root)
        split = "train" if len(rel.parts) == 1 else rel.parts[0]
        if not _SPLIT_RE.fullmatch(split):
            raise ValueError(f"{root / split}: split folder names must match {_SPLIT_RE.pattern}")
        files[split].append(path)
    if not files:
        raise FileNotFoundError(f"no {' / '.join(SUFFIXES)} files under {root}")
    return dict(files)


def read_math_files(
    manual_dir: str | os.PathLike,
    *,
    max_problem_chars: int = 8192,
    max_answer_chars: int = 512,
) -> tuple[dict[str, list[dict[str, str]]], ReadSummary]:
    """Reads, validates and de-duplicates every file -> ({split: rows}, summary).

    Rows are dicts {problem, answer, origin}; raises ValueError when a split keeps no row.
    """
    root = Path(manual_dir)
    summary = ReadSummary()
    out: dict[str, list[dict[str, str]]] = {}
    for split, paths in find_files(root).items():
        seen: set[str] = set()
        rows = out.setdefault(split, [])
        for path in paths:
            summary.files.append(str(path.relative_to(root)))
            reader = _jsonl_rows if path.suffix == ".jsonl" else _parquet_rows
            for i, raw in enumerate(reader(path)):
                summary.rows[split] += 1
                try:
                    if isinstance(raw, RowError):
                        raise raw
                    problem, answer = normalize_row(raw, max_problem_chars, max_answer_chars)
                    key = " ".join(problem.split()).casefold()
                    if key in seen:
                        raise RowError("duplicate")
                except RowError as e:
                    summary.skipped[split][e.reason] += 1
                    continue
                seen.add(key)
                summary.kept[split] += 1
                rows.append({"problem": problem, "answer": answer, "origin": f"{path.name}:{i}"})
        if not rows:
            raise ValueError(f"split {split!r} of {root} has no usable row:\n{summary}")
    log.info("%s", summary)
    return out, summary


@dataclasses.dataclass(eq=False)
class LocalMathConfig(tfds.core.BuilderConfig):
    """Length limits of one local_math build."""

    max_problem_chars: int = 8192
    max_answer_chars: int = 512


class LocalMath(ArrayRecordBuilder, skip_registration=True):
    """User-supplied math problems with final answers."""

    VERSION = VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put JSONL / parquet files of {problem, answer} rows here."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local math problems with final answers.",
            features=tfds.features.FeaturesDict(
                {
                    "problem": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "origin": tfds.features.Text(),
                    "id": np.int64,
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        splits, summary = read_math_files(
            dl_manager.manual_dir,
            max_problem_chars=c.max_problem_chars,
            max_answer_chars=c.max_answer_chars,
        )
        self.info.metadata["summary"] = summary.to_dict()
        return {name: self._generate_examples(name, rows) for name, rows in splits.items()}

    def _generate_examples(self, split, rows):
        for i, row in enumerate(rows):
            yield f"{split}-{i:09d}", {**row, "id": i}


def _files_fingerprint(manual_dir: Path) -> list[list]:
    return [
        [str(p.relative_to(manual_dir)), p.stat().st_size, p.stat().st_mtime_ns]
        for paths in find_files(manual_dir).values()
        for p in paths
    ]


def build_local_math(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    max_problem_chars: int = 8192,
    max_answer_chars: int = 512,
    config_name: str = "default",
    overwrite: bool = False,
    progress: bool = False,
    verbose: bool = True,
) -> BuiltDataset:
    """Prepares `local_math/<config_name>` under `data_dir` from the files in `manual_dir`
    (reused when built from the same files with the same limits). The read summary is logged,
    printed when `verbose`, and kept in `metadata["summary"]`."""
    manual_dir = Path(manual_dir)
    params = {
        "files": _files_fingerprint(manual_dir),  # raises first when the folder is missing
        "max_problem_chars": max_problem_chars,
        "max_answer_chars": max_answer_chars,
    }
    config = LocalMathConfig(
        name=config_name,
        version=VERSION,
        description="local math problems",
        max_problem_chars=max_problem_chars,
        max_answer_chars=max_answer_chars,
    )
    with quiet(not progress):
        builder = LocalMath(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
        ds = prepare(builder, params, overwrite=overwrite, manual_dir=manual_dir)
    if verbose:
        print(format_summary(ds.metadata.get("summary", {})))
    return ds


def format_summary(summary: dict[str, Any]) -> str:
    """The stored summary dict as the text `ReadSummary` prints."""
    s = ReadSummary(files=list(summary.get("files", [])))
    s.rows.update(summary.get("rows", {}))
    s.kept.update(summary.get("kept", {}))
    for split, counts in summary.get("skipped", {}).items():
        s.skipped[split].update(counts)
    return str(s)
