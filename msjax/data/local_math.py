"""TFDS builder `local_math`: math problems from the user's files, in the original work's shapes.

Files: JSONL (one object per line), parquet (one row per record; the verl schema included) and
a JSON list (the C-Eval file). Given as a manual directory, files directly in it form the "train"
split and files in a subdirectory form the split named after it (e.g. `test/aime24.jsonl` ->
split "test"); given as a list of files (`files=`), they form the "train" split.

The prompt of a row, by priority (REFERENCE section 9):
  "prompt" as a list of chat messages {"role", "content"} (verl parquet) -> kind "chat";
  "prompt" or "model_input" as text (AIME JSONL, C-Eval JSON: instructions included) -> "prompt";
  "problem" / "question" (any case) -> kind "problem" (a bare problem; the suffix is added later).
The gold answer: "answer" / "final_answer" / "expected_answer" (any case) or the verl
`reward_model.ground_truth` (a string, or a dict with "target"); without one, the last
`\\boxed{}` of "solution". A GSM8K-style answer ("... #### 42") keeps the part after "####"; a
boxed answer keeps the boxed content.

Each row is validated; bad rows are skipped and counted by reason:
  bad_json (not a JSON object), invalid_utf8, empty_problem, no_answer, bad_field (a field that is
  not text or a number), bad_chat (a chat prompt that is not a list of {role, content} messages
  with known roles), ambiguous (two keys giving different problems or answers), too_long
  (problem or answer longer than the limit), duplicate (same problem, whitespace and case
  folded, already kept in the split).
A file that cannot hold rows at all (a parquet or JSON file that does not parse, a parquet with
no prompt column or, when answers are required, no answer column) is a ValueError naming it.
Features: problem (the text of the problem or prompt: a conversation's last user message),
prompt (the text, or the conversation as JSON), kind, answer, origin ("file:row"), id (int64).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from msjax.data.sources import ArrayRecordBuilder, BuiltDataset, prepare, quiet
from msjax.rewards.math import extract_boxed
from msjax.templates import check_messages

VERSION = tfds.core.Version("1.1.0")
SUFFIXES = (".jsonl", ".parquet", ".json")
PROMPT_KEYS = ("prompt", "model_input")
PROBLEM_KEYS = ("problem", "question")
ANSWER_KEYS = ("answer", "final_answer", "expected_answer")
SOLUTION_KEYS = ("solution",)
SKIP_REASONS = (
    "bad_json",
    "invalid_utf8",
    "empty_problem",
    "no_answer",
    "bad_field",
    "bad_chat",
    "ambiguous",
    "too_long",
    "duplicate",
)
_SPLIT_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
log = logging.getLogger(__name__)


class RowError(Exception):
    """A row skipped for `reason` (one of SKIP_REASONS); `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class MathRow:
    """One usable row. kind: "problem" | "prompt" | "chat"; prompt: the text, or the messages
    for "chat"; problem: the readable text (a conversation's last user message); answer: the
    gold answer or None."""

    kind: str
    prompt: str | tuple[dict[str, str], ...]
    problem: str
    answer: str | None

    def record(self) -> dict[str, str]:
        """The TFDS features of the row (a conversation as JSON)."""
        prompt = self.prompt if isinstance(self.prompt, str) else json.dumps(list(self.prompt))
        return {"kind": self.kind, "prompt": prompt, "problem": self.problem, "answer": self.answer}


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


def _lowered(row: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in row.items()}


def _pick(row: dict[str, Any], keys: tuple[str, ...], extra: Sequence[Any] = ()) -> str | None:
    """The one text that the `keys` of `row` (already lowered) and `extra` values give."""
    values = {t for v in [*(row.get(k) for k in keys), *extra] if (t := _text(v)) is not None}
    if len(values) > 1:
        raise RowError("ambiguous", f"different values for {keys}")
    return next(iter(values), None)


def _ground_truth(row: dict[str, Any]) -> Any:
    """verl's reward_model.ground_truth: a string, or a dict with "target"."""
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        return None
    truth = reward_model.get("ground_truth")
    return truth.get("target") if isinstance(truth, dict) else truth


def _prompt(row: dict[str, Any]) -> tuple[str, Any]:
    """(kind, prompt) of a lowered row; RowError when it has none."""
    value = row.get("prompt")
    if isinstance(value, list | tuple):
        try:
            messages = check_messages(value)
        except ValueError as e:
            raise RowError("bad_chat", str(e)) from e
        if not any(m["content"].strip() for m in messages):
            raise RowError("empty_problem", "every chat message is empty")
        return "chat", messages
    text = _pick(row, PROMPT_KEYS)
    if text is not None:
        return "prompt", text
    text = _pick(row, PROBLEM_KEYS)
    if text is None:
        raise RowError("empty_problem", f"no non-empty {PROMPT_KEYS + PROBLEM_KEYS} field")
    return "problem", text


def normalize_row(
    row: Any, max_problem_chars: int, max_answer_chars: int, *, require_answer: bool = True
) -> MathRow:
    """A raw row -> MathRow; RowError(reason) when the row must be skipped (see the module
    docstring). Without `require_answer`, a row without a gold answer gets answer None."""
    if not isinstance(row, dict):
        raise RowError("bad_json", f"a row must be an object, found {type(row).__name__}")
    row = _lowered(row)
    kind, prompt = _prompt(row)
    if kind == "chat":
        users = [m["content"] for m in prompt if m["role"] == "user"]
        problem = (users or [prompt[-1]["content"]])[-1].strip()
        size = sum(len(m["content"]) for m in prompt)
    else:
        problem = prompt.strip() if kind == "problem" else prompt
        size = len(prompt)
    answer = _pick(row, ANSWER_KEYS, [_ground_truth(row)])
    if answer is not None and "####" in answer:
        answer = answer.rsplit("####", 1)[1].strip() or None
    elif answer is not None and ("\\boxed" in answer or "\\fbox" in answer):
        answer = extract_boxed(answer)
    if answer is None:
        solution = _pick(row, SOLUTION_KEYS)
        answer = extract_boxed(solution) if solution else None
    answer = answer.strip() if answer else None
    if not answer and require_answer:
        raise RowError("no_answer", "no gold answer")
    if size > max_problem_chars or len(answer or "") > max_answer_chars:
        raise RowError("too_long", f"longer than {max_problem_chars} / {max_answer_chars} chars")
    return MathRow(kind, prompt, problem, answer or None)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row) of a JSONL file; RowError rows stand for unreadable lines."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, RowError("invalid_utf8", f"byte {e.start} is not UTF-8")
                continue
            try:
                yield n, json.loads(text)
            except json.JSONDecodeError as e:
                yield n, RowError("bad_json", f"not valid JSON ({e.msg})")


def _check_columns(path: Path, columns: Sequence[str], require_answer: bool) -> None:
    have = {c.lower() for c in columns}
    if not have & {*PROMPT_KEYS, *PROBLEM_KEYS}:
        raise ValueError(
            f"{path} has no prompt column (columns: {sorted(columns)}); it needs one of "
            f"{PROMPT_KEYS + PROBLEM_KEYS}"
        )
    if require_answer and not have & {*ANSWER_KEYS, *SOLUTION_KEYS, "reward_model"}:
        raise ValueError(
            f"{path} has no answer column (columns: {sorted(columns)}); it needs one of "
            f"{ANSWER_KEYS + SOLUTION_KEYS + ('reward_model',)}"
        )


def _parquet_rows(path: Path, require_answer: bool) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ValueError(f"cannot read parquet file {path}: {e}; fix or remove it") from e
    _check_columns(path, table.column_names, require_answer)
    for start in range(0, table.num_rows, 1024):
        yield from enumerate(table.slice(start, 1024).to_pylist(), start=start + 1)


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file ({e}); fix it or write it as JSONL") from e
    if not isinstance(rows, list):
        raise ValueError(
            f"{path} holds a JSON {type(rows).__name__}; a .json data file must be a list of "
            "row objects (one object per line is .jsonl)"
        )
    yield from enumerate(rows, start=1)


def read_rows(path: str | os.PathLike, *, require_answer: bool = True) -> Iterator[tuple[int, Any]]:
    """(row number, raw row or RowError) of a .jsonl / .parquet / .json file; the number is the
    line of a JSONL file and the 1-based row of the others. ValueError naming the file when it
    cannot hold rows (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path, require_answer)
    elif path.suffix == ".json":
        yield from _json_rows(path)
    else:
        raise ValueError(f"{path}: unknown data file type; use {' / '.join(SUFFIXES)}")


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


def explicit_files(files: str | Sequence[str | os.PathLike]) -> dict[str, list[Path]]:
    """{"train": paths} of a list of files (or one comma-separated string); FileNotFoundError /
    ValueError naming a missing file or one of an unknown type."""
    if isinstance(files, str):
        files = [f for f in files.split(",") if f.strip()]
    paths = [Path(os.path.abspath(str(f).strip())) for f in files]
    if not paths:
        raise ValueError("no data files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"data file {p} does not exist")
        if p.suffix not in SUFFIXES:
            raise ValueError(f"{p}: unknown data file type; use {' / '.join(SUFFIXES)}")
    return {"train": paths}


def read_math_files(
    manual_dir: str | os.PathLike | None = None,
    *,
    files: str | Sequence[str | os.PathLike] | None = None,
    max_problem_chars: int = 8192,
    max_answer_chars: int = 512,
) -> tuple[dict[str, list[dict[str, str]]], ReadSummary]:
    """Reads, validates and de-duplicates every file of `manual_dir` (or the list `files`) ->
    ({split: rows}, summary). Rows are `MathRow.record()` dicts plus "origin"; raises ValueError
    when a split keeps no row."""
    if (manual_dir is None) == (files is None):
        raise ValueError("pass either manual_dir or files")
    root = None if manual_dir is None else Path(manual_dir)
    splits = find_files(root) if root is not None else explicit_files(files)
    summary = ReadSummary()
    out: dict[str, list[dict[str, str]]] = {}
    for split, paths in splits.items():
        seen: set[str] = set()
        rows = out.setdefault(split, [])
        for path in paths:
            summary.files.append(str(path.relative_to(root)) if root else str(path))
            for n, raw in read_rows(path):
                summary.rows[split] += 1
                try:
                    if isinstance(raw, RowError):
                        raise raw
                    row = normalize_row(raw, max_problem_chars, max_answer_chars)
                    key = " ".join(row.problem.split()).casefold()
                    if key in seen:
                        raise RowError("duplicate")
                except RowError as e:
                    summary.skipped[split][e.reason] += 1
                    continue
                seen.add(key)
                summary.kept[split] += 1
                rows.append({**row.record(), "origin": f"{path.name}:{n}"})
        if not rows:
            where = root or ", ".join(map(str, paths))
            raise ValueError(f"split {split!r} of {where} has no usable row:\n{summary}")
    log.info("%s", summary)
    return out, summary


@dataclasses.dataclass(eq=False)
class LocalMathConfig(tfds.core.BuilderConfig):
    """Length limits of one local_math build; `files`: explicit files (else the manual dir)."""

    max_problem_chars: int = 8192
    max_answer_chars: int = 512
    files: tuple[str, ...] = ()


class LocalMath(ArrayRecordBuilder, skip_registration=True):
    """User-supplied math problems with final answers."""

    VERSION = VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put .jsonl / .parquet / .json files of math rows here."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local math problems with final answers.",
            features=tfds.features.FeaturesDict(
                {
                    "problem": tfds.features.Text(),
                    "prompt": tfds.features.Text(),
                    "kind": tfds.features.Text(),
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
            None if c.files else dl_manager.manual_dir,
            files=c.files or None,
            max_problem_chars=c.max_problem_chars,
            max_answer_chars=c.max_answer_chars,
        )
        self.info.metadata["summary"] = summary.to_dict()
        return {name: self._generate_examples(name, rows) for name, rows in splits.items()}

    def _generate_examples(self, split, rows):
        for i, row in enumerate(rows):
            yield f"{split}-{i:09d}", {**row, "id": i}


def files_config_name(files: str | Sequence[str | os.PathLike]) -> str:
    """The config name of a build from a list of files: "files_<hash of their paths>"."""
    paths = "\n".join(str(p) for p in explicit_files(files)["train"])
    return f"files_{hashlib.sha1(paths.encode()).hexdigest()[:10]}"


def _fingerprint(splits: dict[str, list[Path]], root: Path | None) -> list[list]:
    return [
        [str(p.relative_to(root) if root else p), p.stat().st_size, p.stat().st_mtime_ns]
        for paths in splits.values()
        for p in paths
    ]


def build_local_math(
    manual_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    *,
    files: str | Sequence[str | os.PathLike] | None = None,
    max_problem_chars: int = 8192,
    max_answer_chars: int = 512,
    config_name: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    verbose: bool = True,
) -> BuiltDataset:
    """Prepares `local_math/<config_name>` under `data_dir` from the files in `manual_dir`, or
    from the list `files` (one "train" split; manual_dir None). It is reused when built from the
    same files with the same limits. config_name defaults to "default" for a manual dir and to
    "files_<hash of the paths>" for a list of files. The read summary is logged, printed when
    `verbose`, and kept in `metadata["summary"]`."""
    root = None if manual_dir is None else Path(manual_dir)
    if (root is None) == (files is None):
        raise ValueError("pass either manual_dir or files")
    splits = find_files(root) if root is not None else explicit_files(files)  # raises first
    paths = tuple(str(p) for p in splits.get("train", [])) if root is None else ()
    if config_name is None:
        config_name = "default" if root is not None else files_config_name(files)
    params = {
        "files": _fingerprint(splits, root),
        "max_problem_chars": max_problem_chars,
        "max_answer_chars": max_answer_chars,
    }
    config = LocalMathConfig(
        name=config_name,
        version=VERSION,
        description="local math problems",
        max_problem_chars=max_problem_chars,
        max_answer_chars=max_answer_chars,
        files=paths,
    )
    with quiet(not progress):
        builder = LocalMath(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
        ds = prepare(builder, params, overwrite=overwrite, manual_dir=root)
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
