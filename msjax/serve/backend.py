"""Every call `msjax-serve` makes into generation and scoring, behind one small class, so the
decoding engine can be swapped without touching the HTTP side.

`SamplerBackend` drives the fixed-batch `msjax.generate.Sampler`: its temperature, repetition
penalty and decode length are compiled in, so the batcher groups rows by `group(row)` and one
compiled program serves each group and batch bucket. Rows are single samples
(n = 1 per row, prompts repeated), so requests with any `response_num` share a call. A row's
randomness depends only on its `row_id` (from the request's seed and the sample index), never on
the other rows of its batch. Responses shorter than the bucket's decode length are cut on the
host (`msjax.serve.stops`), and so are text stop strings.

Shapes: batch rows are powers of two up to `max_batch_rows` (multiples of the mesh's batch
shards); prompts are left-padded to `prompt_buckets` (powers of two from 64, and finally the
context minus one); decode lengths are powers of two from 16, capped at the context left after
the row's prompt bucket (a row asking more stops there with finish reason "length").
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from msjax.generate.config import SamplerConfig
from msjax.generate.prompts import choose_bucket
from msjax.generate.sampler import Sampler
from msjax.hf.score_module import find_score_module
from msjax.scoring import score_texts
from msjax.serve.stops import Sample, find_stop, geometric_mean, steps_after_cut

log = logging.getLogger(__name__)

TOP_P = 0.95  # the original server's fixed nucleus mass
REPETITION_PENALTY = 1.05  # the original server's
MIN_NEW_TOKENS = 16
_ROW_ID_LIMIT = 2**31 - 2  # Sampler row ids: int32, distinct, (id + 1) * n fits


def row_id(seed: int, index: int) -> int:
    """The randomness id of sample `index` of a request with `seed` (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _ROW_ID_LIMIT


def untrained_head(path: str | os.PathLike) -> str | None:
    """Why the SPRM head of the model at `path` is untrained, or None when it is trained.

    A Hugging Face folder needs score_module.pt / .safetensors (without one the head is freshly
    initialised). An msjax checkpoint is refused only when its msjax.json says the head is fresh
    (`"head": {"trained": false}`); older checkpoints carry no such record and are accepted.
    """
    path = Path(path)
    meta = path / "msjax.json"
    if meta.is_file():
        head = json.loads(meta.read_text(encoding="utf-8")).get("head")
        if isinstance(head, dict) and head.get("trained") is False:
            return f"{meta} records a freshly initialised SPRM head"
        return None
    if find_score_module(path) is None:
        return f"{path} has no score_module.pt or score_module.safetensors (the SPRM head)"
    return None


@dataclasses.dataclass(frozen=True)
class Row:
    """One sample to generate. prompt: token ids; max_tokens: the request's limit (>= 1);
    temperature: 0 = greedy; row_id: randomness id (`row_id`); stop: text stop strings;
    repetition_penalty: vLLM's (1 = off)."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float
    row_id: int
    stop: tuple[str, ...] = ()
    repetition_penalty: float = REPETITION_PENALTY


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from lo below hi, then hi itself."""
    out = []
    b = lo
    while b < hi:
        out.append(b)
        b *= 2
    return (*out, hi)


class SamplerBackend:
    """Generation and scoring on one loaded model (single device or a mesh).

    Args:
      model: a ReflectiveModel; cfg: its ModelConfig; tokenizer: msjax.tokenizer.Tokenizer.
      max_batch_rows: most rows (samples, or texts to score) in one compiled call.
      row_buckets: the padded batch sizes (default: powers of two up to max_batch_rows); each is
        rounded up to a multiple of the mesh's batch shards.
      mesh: the mesh the model is sharded on, or None.
      min_prompt_bucket: the smallest prompt bucket (then powers of two).
      key_seed: the sampling key every row id is folded into.
    """

    def __init__(
        self,
        model,
        cfg,
        tokenizer,
        *,
        max_batch_rows: int = 32,
        row_buckets: Sequence[int] | None = None,
        mesh=None,
        min_prompt_bucket: int = 64,
        key_seed: int = 0,
    ):
        self.model, self.cfg, self.tokenizer, self.mesh = model, cfg, tokenizer, mesh
        self.params = nnx.state(model)
        self.context = cfg.max_position_embeddings
        if self.context < 2:
            raise ValueError(f"the model's context of {self.context} positions is too short.")
        shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        wanted = row_buckets or pow2_buckets(1, max_batch_rows)
        if min(wanted) < 1 or max(wanted) != max_batch_rows:
            raise ValueError(
                f"row_buckets={wanted} must be sizes >= 1 whose largest is max_batch_rows="
                f"{max_batch_rows}."
            )
        self.row_buckets = tuple(sorted({-(-b // shards) * shards for b in wanted}))
        self.max_batch_rows = self.row_buckets[-1]
        last = self.context - 1
        self.prompt_buckets = pow2_buckets(min(min_prompt_bucket, last), last)
        self.key = jax.random.key(key_seed)
        self._samplers: dict[tuple[float, float, int], Sampler] = {}

    # ----------------------------------------------------------------------------- shapes

    def max_prompt_tokens(self) -> int:
        """The longest prompt that leaves room for one generated token."""
        return self.context - 1

    def limit(self, row: Row) -> int:
        """The most tokens `row` can generate: its max_tokens, capped by the context left after
        its prompt bucket."""
        return min(row.max_tokens, self._room(row))

    def _room(self, row: Row) -> int:
        return self.context - choose_bucket(len(row.prompt), self.prompt_buckets)

    def group(self, row: Row) -> tuple[float, float, int]:
        """Rows with equal groups share one compiled call: (temperature, repetition penalty,
        decode length)."""
        length = _next_pow2(max(self.limit(row), MIN_NEW_TOKENS))
        return row.temperature, row.repetition_penalty, min(length, self._room(row))

    def batch_rows(self, n: int) -> int:
        """The padded batch size for n rows."""
        return next(b for b in self.row_buckets if b >= n)

    # ----------------------------------------------------------------------------- calls

    def warmup(self, temperature: float, max_tokens: int, repetition_penalty: float) -> None:
        """Compiles generation with these settings for a short prompt, and scoring of a short
        text, for every batch bucket."""
        prompt = (self.tokenizer.eos_id,)
        for rows in self.row_buckets:
            row = lambda i: Row(prompt, max_tokens, temperature, i, (), repetition_penalty)
            self.generate([row(i) for i in range(rows)])
            self.score([list(prompt)] * rows)

    def _sampler(self, temperature: float, penalty: float, new_tokens: int) -> Sampler:
        key = (temperature, penalty, new_tokens)
        if key not in self._samplers:
            config = SamplerConfig.from_tokenizer(
                self.tokenizer,
                max_new_tokens=new_tokens,
                temperature=temperature,
                top_p=TOP_P,
                repetition_penalty=penalty,
                prompt_buckets=self.prompt_buckets,
            )
            self._samplers[key] = Sampler(self.model, self.cfg, config, mesh=self.mesh)
        return self._samplers[key]

    def generate(self, rows: Sequence[Row]) -> list[Sample]:
        """Samples of rows that share one `group` (at most max_batch_rows of them), in order."""
        groups = {self.group(r) for r in rows}
        if len(groups) != 1 or len(rows) > self.max_batch_rows:
            raise ValueError(f"generate() takes up to {self.max_batch_rows} rows of one group.")
        group = groups.pop()
        ids = [r.row_id for r in rows]
        if len(set(ids)) != len(ids):  # the same seed and index twice in one batch: split it
            seen: set[int] = set()
            parts: tuple[list[int], list[int]] = ([], [])
            for i, r in enumerate(rows):
                parts[r.row_id in seen].append(i)
                seen.add(r.row_id)
            out: list[Sample | None] = [None] * len(rows)
            for part in parts:
                for i, sample in zip(part, self.generate([rows[i] for i in part]), strict=True):
                    out[i] = sample
            return out
        fill = self.batch_rows(len(rows)) - len(rows)
        taken = set(ids)
        spare = list(itertools.islice((i for i in itertools.count() if i not in taken), fill))
        prompts = [list(r.prompt) for r in rows] + [list(rows[0].prompt)] * fill
        result = self._sampler(*group)(
            self.params, prompts, n=1, key=self.key, prompt_ids=ids + spare
        ).to_host()
        reasons = result.finish_reasons()
        out = []
        for i, r in enumerate(rows):
            scores, positions = result.steps(i)
            sample = Sample(
                tokens=result.response(i),
                finish=reasons[i],
                score=float(result.scores[i]),
                step_scores=scores,
                step_positions=positions,
            )
            out.append(self._finish(r, sample))
        return out

    def _finish(self, row: Row, sample: Sample) -> Sample:
        """Cuts `sample` at the first stop string or at the row's limit, rescoring if needed."""
        cut, reason, text = None, sample.finish, None
        stop = find_stop(sample.tokens, row.stop, self.decode)
        if stop is not None:
            (cut, text), reason = stop, "stop"
        limit = self.limit(row)
        if len(sample.tokens) > limit and (cut is None or cut > limit):
            cut, reason, text = limit, "length", None
        if cut is None:
            return dataclasses.replace(sample, text=self.decode(sample.tokens))
        t = self.tokenizer
        shorter = steps_after_cut(
            row.prompt, sample, cut, t.step_ids, t.think_start_id, t.think_end_id
        )
        if shorter is None:  # the cut removed the only <think>: score the shorter text afresh
            ids = [*row.prompt, *sample.tokens[:cut]]
            (scored,) = self.score([ids])
            # Streamed scores count delimiters of the response only (msjax.generate.steps).
            first = len(row.prompt) - 1
            steps = [
                (p, s)
                for p, s in zip(scored["step_positions"], scored["step_scores"], strict=True)
                if p >= first
            ]
            shorter = Sample(
                tokens=list(sample.tokens[:cut]),
                finish=reason,
                score=geometric_mean([s for _, s in steps]),
                step_scores=[s for _, s in steps],
                step_positions=[p for p, _ in steps],
            )
        if text is None:
            text = self.decode(shorter.tokens)
        return dataclasses.replace(shorter, finish=reason, text=text)

    def score(self, texts: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
        """Full-forward SPRM scores of token-id lists (`msjax.scoring.score_texts`):
        [{"value", "step_scores", "step_positions"}]."""
        rows = self.batch_rows(min(len(texts), self.max_batch_rows))
        return score_texts(self.model, _PreTokenized(self.tokenizer), list(texts), rows)

    def decode(self, ids: Sequence[int]) -> str:
        """Response text as the original server returns it (special tokens skipped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _PreTokenized:
    """The tokenizer seen by `score_texts` when the "texts" are already token-id lists."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode_batch(self, texts):
        return [list(t) for t in texts]
