"""Batched full-forward SPRM scoring of whole texts: the service of the original `/score` endpoint.

Each text is tokenized as it is (no special tokens added: the text carries its own template),
run through one full forward pass, and scored with the SPRM head at the step positions of
REFERENCE section 2 (the "inference" rule of `msjax.models.step_mask`). Texts are sorted by
length and right-padded to a few bucket lengths (powers of two from `min_bucket`, then multiples
of `BUCKET_STEP`) and a fixed batch size, so a handful of compiled shapes serve any input.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from msjax import global_arrays
from msjax import sharding as sh
from msjax.models.reflective import ReflectiveModel
from msjax.models.sprm import step_mask, trajectory_score

log = logging.getLogger(__name__)

BUCKET_STEP = 2048
_NULL_ROW = {"value": None, "step_scores": None, "step_positions": None}


def bucket_length(n: int, min_bucket: int = 16) -> int:
    """The padded length for a text of n tokens: a power of two >= max(n, min_bucket) up to
    BUCKET_STEP, then the next multiple of BUCKET_STEP."""
    n = max(n, min_bucket, 1)
    if n > BUCKET_STEP:
        return -(-n // BUCKET_STEP) * BUCKET_STEP
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _scorer(graphdef, step_ids: tuple[int, ...], think_start: int | None, think_end: int | None):
    @jax.jit
    def score(state, tokens, valid):
        """tokens int32[b, t], valid bool[b, t] -> (step scores f32[b, t], mask bool[b, t],
        value f32[b])."""
        model = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        out = model(tokens, positions, valid, compute_logits=False)
        logits = model.step_logits(out.penultimate)
        mask = step_mask(tokens, valid, step_ids, think_start, think_end)
        return jax.nn.sigmoid(logits), mask, trajectory_score(logits, mask)

    return score


def _model_mesh(state):
    for leaf in jax.tree.leaves(state):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def score_texts(
    model: ReflectiveModel,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 8,
    *,
    min_bucket: int = 16,
) -> list[dict[str, Any]]:
    """SPRM scores of whole texts.

    Args:
      model: the reflective model (single device or sharded on a mesh).
      tokenizer: an msjax.tokenizer.Tokenizer (encode_batch, pad_id, step_ids, think_start_id,
        think_end_id).
      texts: the texts (prompt + response), scored independently.
      batch_size: rows per forward pass (rounded up to a multiple of the mesh's batch shards).
    Returns one dict per text: {"value": geometric mean of the step scores (0.0 with no step),
    "step_scores": [sigmoid(SPRM logit) per step], "step_positions": [index in the text's tokens
    of the token whose hidden state was scored, i.e. the token just before each delimiter]}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    ids = tokenizer.encode_batch(list(texts)) if texts else []
    graphdef, state = nnx.split(model)
    score = _scorer(
        graphdef, tuple(tokenizer.step_ids), tokenizer.think_start_id, tokenizer.think_end_id
    )
    mesh = _model_mesh(state)
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-batch_size // shards) * shards

    def put(x):
        if mesh is None:
            return jnp.asarray(x)
        return global_arrays.to_global(x, sh.batch_sharding(mesh))

    results: list[dict[str, Any] | None] = [None] * len(ids)
    groups: dict[int, list[int]] = {}
    for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
        if not ids[i]:
            results[i] = {"value": 0.0, "step_scores": [], "step_positions": []}
        else:
            groups.setdefault(bucket_length(len(ids[i]), min_bucket), []).append(i)
    ctx = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
    with ctx:
        for length, members in sorted(groups.items()):
            for start in range(0, len(members), rows):
                chunk = members[start : start + rows]
                tokens = np.full((rows, length), tokenizer.pad_id, np.int32)
                valid = np.zeros((rows, length), bool)
                for r, i in enumerate(chunk):
                    tokens[r, : len(ids[i])] = ids[i]
                    valid[r, : len(ids[i])] = True
                probs, mask, value = jax.device_get(score(state, put(tokens), put(valid)))
                for r, i in enumerate(chunk):
                    pos = np.flatnonzero(mask[r])
                    results[i] = {
                        "value": float(value[r]),
                        "step_scores": [float(p) for p in probs[r, pos]],
                        "step_positions": [int(p) for p in pos],
                    }
    return results


def parse_row(line: str) -> str:
    """The text of one JSONL row: {"text": str} or {"prompt": str, "response": str} (joined by
    plain concatenation). ValueError naming the problem otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, found {type(row).__name__}")
    if "text" in row:
        if not isinstance(row["text"], str):
            raise ValueError("'text' must be a string")
        return row["text"]
    if "prompt" in row and "response" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["response"], str):
            raise ValueError("'prompt' and 'response' must be strings")
        return row["prompt"] + row["response"]
    raise ValueError("a row needs 'text', or 'prompt' and 'response'")


def score_file(
    model: ReflectiveModel,
    tokenizer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    batch_size: int = 8,
    *,
    chunk_rows: int = 4096,
) -> dict[str, int]:
    """Scores a JSONL file of texts (see `parse_row`) into a JSONL file, row for row.

    Every non-blank input line gives one output line: {"value", "step_scores",
    "step_positions"} (see `score_texts`), or, for a malformed row (bad JSON, not UTF-8, missing
    fields), {"value": null,
    "step_scores": null, "step_positions": null, "error": "line N: ..."} (counted, logged).
    Blank lines are ignored. The output is written to a temporary file in the same folder and
    renamed at the end. Returns {"rows": n, "scored": n, "skipped": n}.
    """
    output_path = Path(output_path)
    counts = {"rows": 0, "scored": 0, "skipped": 0}
    fd, tmp = tempfile.mkstemp(
        prefix=f".{output_path.name}.", suffix=".tmp", dir=output_path.parent
    )
    try:
        with open(input_path, "rb") as src, os.fdopen(fd, "w", encoding="utf-8") as dst:

            def flush(pending):
                texts = [t for t, _ in pending if t is not None]
                scores = iter(score_texts(model, tokenizer, texts, batch_size))
                for text, error in pending:
                    out = next(scores) if text is not None else {**_NULL_ROW, "error": error}
                    dst.write(json.dumps(out) + "\n")

            pending: list[tuple[str | None, str | None]] = []
            for n, line in enumerate(src, start=1):
                if not line.strip():
                    continue
                counts["rows"] += 1
                try:
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"not UTF-8 text (byte {e.start})") from e
                    pending.append((parse_row(text), None))
                    counts["scored"] += 1
                except ValueError as e:
                    counts["skipped"] += 1
                    log.warning("%s line %d skipped: %s", input_path, n, e)
                    pending.append((None, f"line {n}: {e}"))
                if len(pending) >= chunk_rows:
                    flush(pending)
                    pending = []
            flush(pending)
        os.replace(tmp, output_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return counts
