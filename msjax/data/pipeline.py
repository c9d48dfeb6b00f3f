"""Grain pipelines from a random-access source (e.g. `tfds.data_source`) to trainer batches.

Both pipelines first read every record once (a pre-pass) to template and tokenize it and drop,
counted, the ones that are too long or have an empty problem; `stats` holds the counts. Knowing
the kept set up front gives every process a shard of exactly the same size (the few examples past
a multiple of the process count are dropped, counted), so that all processes yield the same number
of batches. Then, per process, a `grain.MapDataset`: the shard's records, a seeded shuffle that
differs per epoch, repeat (`num_epochs=None`: forever), templating + tokenization again per element
(the pre-pass keeps only lengths), batching with padding to the smallest length bucket that fits.

Iterating gives a `DataIterator` whose `get_state()` is a small JSON-serialisable dict (grain's
position plus the pipeline's fingerprint): `set_state` on a fresh iterator of an identically
configured pipeline, in any process, continues with exactly the same batches. Everything runs in
the calling thread by default (`num_threads=0`: no grain worker processes, no absl flags needed).
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from msjax.templates import ChatTemplate, render_prompt
from msjax.tokenizer import MATH_SUFFIX, Tokenizer

log = logging.getLogger(__name__)
ResponseFn = Callable[[dict, np.random.Generator], str]


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_len`, then `max_len` itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


def as_text(value: Any) -> str:
    """A record field (UTF-8 bytes from TFDS, or str) as str."""
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8")
    return str(value)


def _read(source, indices: Sequence[int]) -> list[dict]:
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(list(indices)))
    return [source[i] for i in indices]


class DataIterator:
    """Batches of a pipeline, with exact `get_state()` / `set_state(state)`."""

    def __init__(self, iter_ds: grain.IterDataset, fingerprint: dict[str, Any]):
        self._it = iter(iter_ds)
        self._fingerprint = fingerprint

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position of this iterator."""
        return {"grain": self._it.get_state(), "pipeline": dict(self._fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position from `get_state` of an identically configured pipeline."""
        if state.get("pipeline") != self._fingerprint:
            raise ValueError(
                f"data iterator state was saved by a pipeline configured as {state.get('pipeline')}"
                f", this one is {self._fingerprint}; restore with the same data and settings"
            )
        self._it.set_state(state["grain"])


class _Pipeline(abc.ABC):
    """The shared part: pre-pass, sharding, shuffle, repeat, batching, iteration."""

    kind = ""

    def __init__(
        self,
        source,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        max_len: int,
        buckets: Sequence[int] | None,
        template: str | None,
        suffix: str | None,
        seed: int,
        shuffle: bool,
        num_epochs: int | None,
        shard_index: int | None,
        shard_count: int | None,
        drop_remainder: bool,
        num_threads: int,
    ):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.max_len = batch_size, max_len
        self.buckets = tuple(sorted(buckets)) if buckets else default_buckets(max_len)
        if self.buckets[-1] < max_len:
            raise ValueError(f"buckets {self.buckets} must reach max_len {max_len}")
        self.template, self.suffix = template or None, suffix
        self.chat = ChatTemplate.of(tokenizer)
        render_prompt("x", template=self.template, chat=self.chat)  # a bad template -> error now
        self.seed, self.drop_remainder = seed, drop_remainder
        if shard_index is None or shard_count is None:
            import jax

            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(
                f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}"
            )

        lengths, empty = self._prepass()
        keep = np.flatnonzero((lengths <= max_len) & ~empty)
        per_shard = len(keep) // shard_count
        if per_shard == 0:
            raise ValueError(
                f"{self.kind} pipeline: {len(keep)} usable examples of {len(lengths)} cannot "
                f"fill {shard_count} shards (too long: {int(((lengths > max_len) & ~empty).sum())}"
                f", empty: {int(empty.sum())}); raise max_len or add data"
            )
        self.shard = keep[shard_index : per_shard * shard_count : shard_count]
        self.stats = {
            "examples": len(lengths),
            "empty": int(empty.sum()),
            "too_long": int(((lengths > max_len) & ~empty).sum()),
            "dropped_for_sharding": len(keep) - per_shard * shard_count,
            "shard_size": per_shard,
        }
        log.info("%s pipeline (shard %d/%d): %s", self.kind, shard_index, shard_count, self.stats)
        fingerprint = {
            "kind": self.kind,
            "examples": len(lengths),
            "kept": len(keep),
            "max_len": max_len,
            "buckets": self.buckets,
            "template": self.template,
            "suffix": suffix,
            "vocab_size": tokenizer.vocab_size,
            "batch_size": batch_size,
            "seed": seed,
            "shuffle": shuffle,
            "num_epochs": num_epochs,
            "shard_index": shard_index,
            "shard_count": shard_count,
        }
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as a restored state holds it
        ds = grain.MapDataset.source([int(i) for i in self.shard])
        if shuffle:
            ds = ds.shuffle(seed=seed)
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        ds = ds.map(self._example)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=self._collate)
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
        self._dataset = ds.to_iter_dataset(options)

    def __len__(self) -> int:
        """shard_size / batch_size: the batches of one epoch in this process (rounded down when
        drop_remainder, else up; with several epochs, batches run across epoch boundaries)."""
        if self.drop_remainder:
            return self.stats["shard_size"] // self.batch_size
        return -(-self.stats["shard_size"] // self.batch_size)

    def __iter__(self) -> DataIterator:
        return DataIterator(self._dataset, self.fingerprint)

    def _prompt_text(self, record: dict) -> str:
        """The record rendered by `msjax.templates.render_prompt` (records without "kind", e.g.
        the synthetic task's, are bare problems)."""
        kind = as_text(record["kind"]) if "kind" in record else "problem"
        prompt = as_text(record["prompt"] if "prompt" in record else record["problem"])
        if kind == "chat":
            prompt = json.loads(prompt)
        try:
            return render_prompt(
                prompt, kind=kind, template=self.template, chat=self.chat, suffix=self.suffix
            )
        except ValueError as e:
            where = as_text(record["origin"]) if "origin" in record else "a record"
            raise ValueError(f"{where}: {e}") from e

    @abc.abstractmethod
    def _prepass(self) -> tuple[np.ndarray, np.ndarray]:
        """lengths int64[examples] and empty bool[examples] of every record."""

    @abc.abstractmethod
    def _example(self, index: int) -> dict[str, Any]:
        """Record `index` templated and tokenized."""

    @abc.abstractmethod
    def _collate(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Elements -> one padded batch."""

    def _padded(self, elements: Sequence[dict[str, Any]]) -> tuple[list[dict], np.ndarray]:
        """Elements filled up to batch_size by repeating the last one; weights f32[batch]."""
        n = len(elements)
        weights = np.zeros(self.batch_size, np.float32)
        weights[:n] = 1.0
        fill = [{**elements[-1], "index": -1}] * (self.batch_size - n)
        return [*elements, *fill], weights


class PromptPipeline(_Pipeline):
    """Batches of templated prompts for RL rollouts.

    Batch: prompt_tokens int32[batch, L] LEFT-padded with pad_id, L = the smallest bucket >= the
    longest prompt in the batch; prompt_lengths int32[batch]; problem, answer object[batch] (str);
    index int64[batch] (record index in the source, -1 for fill rows); weights f32[batch] (0 for
    rows that fill a final partial batch when drop_remainder=False).
    """

    kind = "prompt"

    def __init__(
        self,
        source,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        max_prompt_len: int,
        buckets: Sequence[int] | None = None,
        template: str | None = None,
        suffix: str | None = MATH_SUFFIX,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
        drop_remainder: bool = True,
        num_threads: int = 0,
    ):
        super().__init__(
            source,
            tokenizer,
            batch_size=batch_size,
            max_len=max_prompt_len,
            buckets=buckets,
            template=template,
            suffix=suffix,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            shard_index=shard_index,
            shard_count=shard_count,
            drop_remainder=drop_remainder,
            num_threads=num_threads,
        )

    def _prepass(self):
        n = len(self.source)
        lengths, empty = np.zeros(n, np.int64), np.zeros(n, bool)
        for lo in range(0, n, 1024):
            records = _read(self.source, range(lo, min(n, lo + 1024)))
            for j, r in enumerate(records):
                empty[lo + j] = not as_text(r["problem"]).strip()
            ids = self.tokenizer.encode_batch([self._prompt_text(r) for r in records])
            lengths[lo : lo + len(records)] = [len(x) for x in ids]
        return lengths, empty

    def _example(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        return {
            "tokens": np.asarray(self.tokenizer.encode(self._prompt_text(record)), np.int32),
            "problem": as_text(record["problem"]),
            "answer": as_text(record.get("answer", "")),
            "index": index,
        }

    def _collate(self, elements):
        elements, weights = self._padded(elements)
        lengths = np.asarray([len(e["tokens"]) for e in elements], np.int32)
        length = bucket_length(int(lengths.max()), self.buckets)
        tokens = np.full((len(elements), length), self.tokenizer.pad_id, np.int32)
        for row, e in enumerate(elements):
            tokens[row, length - len(e["tokens"]) :] = e["tokens"]
        return {
            "prompt_tokens": tokens,
            "prompt_lengths": lengths,
            "problem": np.asarray([e["problem"] for e in elements], object),
            "answer": np.asarray([e["answer"] for e in elements], object),
            "index": np.asarray([e["index"] for e in elements], np.int64),
            "weights": weights,
        }


def gold_response(record: dict, rng: np.random.Generator) -> str:
    """The record's "solution" field (the default SFT response)."""
    del rng
    return as_text(record["solution"])


class SftPipeline(_Pipeline):
    """Batches of prompt + response + EOS for supervised warm starts.

    `response_fn(record, rng) -> str` makes the response (default: the record's "solution"); its
    rng is seeded by (seed, record index), so a record always gets the same response.
    Batch: tokens int32[batch, L] RIGHT-padded with pad_id (L = smallest bucket >= the longest);
    loss_mask f32[batch, L], 1 on response tokens and the EOS (the targets: train logits[:, :-1]
    against tokens[:, 1:] masked by loss_mask[:, 1:]); lengths, prompt_lengths int32[batch];
    index int64[batch]; weights f32[batch] (0 for fill rows).
    """

    kind = "sft"

    def __init__(
        self,
        source,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        max_len: int,
        response_fn: ResponseFn = gold_response,
        buckets: Sequence[int] | None = None,
        template: str | None = None,
        suffix: str | None = MATH_SUFFIX,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
        drop_remainder: bool = True,
        num_threads: int = 0,
    ):
        self.response_fn = response_fn
        super().__init__(
            source,
            tokenizer,
            batch_size=batch_size,
            max_len=max_len,
            buckets=buckets,
            template=template,
            suffix=suffix,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            shard_index=shard_index,
            shard_count=shard_count,
            drop_remainder=drop_remainder,
            num_threads=num_threads,
        )

    def _texts(self, index: int, record: dict) -> tuple[str, str]:
        rng = np.random.default_rng([self.seed, index])
        return self._prompt_text(record), self.response_fn(record, rng)

    def _prepass(self):
        n = len(self.source)
        lengths, empty = np.zeros(n, np.int64), np.zeros(n, bool)
        for lo in range(0, n, 1024):
            records = _read(self.source, range(lo, min(n, lo + 1024)))
            texts = [self._texts(lo + j, r) for j, r in enumerate(records)]
            for j, r in enumerate(records):
                empty[lo + j] = not as_text(r["problem"]).strip()
            ids = self.tokenizer.encode_batch([t for pair in texts for t in pair])
            lengths[lo : lo + len(records)] = [
                len(ids[2 * j]) + len(ids[2 * j + 1]) + 1 for j in range(len(records))
            ]
        return lengths, empty

    def _example(self, index: int) -> dict[str, Any]:
        prompt, response = self._texts(index, self.source[index])
        p = self.tokenizer.encode(prompt)
        r = [*self.tokenizer.encode(response), self.tokenizer.eos_id]
        return {"tokens": np.asarray(p + r, np.int32), "prompt_length": len(p), "index": index}

    def _collate(self, elements):
        elements, weights = self._padded(elements)
        lengths = np.asarray([len(e["tokens"]) for e in elements], np.int32)
        length = bucket_length(int(lengths.max()), self.buckets)
        tokens = np.full((len(elements), length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((len(elements), length), np.float32)
        for row, e in enumerate(elements):
            tokens[row, : len(e["tokens"])] = e["tokens"]
            mask[row, e["prompt_length"] : len(e["tokens"])] = 1.0
        return {
            "tokens": tokens,
            "loss_mask": mask,
            "lengths": lengths,
            "prompt_lengths": np.asarray([e["prompt_length"] for e in elements], np.int32),
            "index": np.asarray([e["index"] for e in elements], np.int64),
            "weights": weights,
        }
