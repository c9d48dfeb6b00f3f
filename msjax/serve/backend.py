"""Every call `msjax-serve` makes into generation and scoring, behind one small class, so the
decoding engine can be swapped without touching the HTTP side.

`EngineBackend` drives a session of the continuous-batching `msjax.generate.engine.Engine`:
requests are added whenever they arrive and join the decode at the next chunk boundary; each
request's settings (temperature incl. 0 = greedy, top_p, repetition penalty, max tokens, seed,
stop sequences) are per-row values of the decode state, so no setting triggers a compile. The
compiled programs depend only on the slot count, the KV window bucket and the admitted prompts'
bucket. A request's samples draw from its seed alone (sample j: fold_in(key(seed), j)), whatever
else is decoded with it. Stop strings are matched on the decoded text (`msjax.serve.stops`);
their token encodings also stop the decode early where they fit the engine's stop capacity.
Scoring runs whole texts through `msjax.scoring.score_texts` (the library of msjax-score).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from msjax.generate.config import SamplerConfig
from msjax.generate.engine import Engine, Request
from msjax.hf.score_module import find_score_module
from msjax.scoring import score_texts
from msjax.serve.stops import Sample, find_stop, geometric_mean, steps_after_cut

log = logging.getLogger(__name__)

TOP_P = 0.95  # the original server's fixed nucleus mass
REPETITION_PENALTY = 1.05  # the original server's


def untrained_head(path: str | os.PathLike) -> str | None:
    """Why the SPRM head of the model at `path` is untrained, or None when it is trained.

    A Hugging Face folder needs score_module.pt / .safetensors (without one the head is freshly
    initialised). An msjax checkpoint is refused when its msjax.json records a fresh head
    (`"head": "fresh"`); checkpoints without that record are taken as trained.
    """
    path = Path(path)
    meta = path / "msjax.json"
    if meta.is_file():
        if json.loads(meta.read_text(encoding="utf-8")).get("head") == "fresh":
            return f"{meta} records a freshly initialised SPRM head"
        return None
    if find_score_module(path) is None:
        return f"{path} has no score_module.pt or score_module.safetensors (the SPRM head)"
    return None


@dataclasses.dataclass(frozen=True)
class Generation:
    """One /generate request's decoding: prompt token ids; n samples; max_tokens (>= 1);
    temperature (0 = greedy); seed (< 2^64); stop strings; repetition_penalty (1 = off)."""

    prompt: tuple[int, ...]
    n: int
    max_tokens: int
    temperature: float
    seed: int
    stop: tuple[str, ...] = ()
    repetition_penalty: float = REPETITION_PENALTY


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a request seed < 2^64 (equal to jax.random.key(seed) below 2^32)."""
    data = np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(data)


class EngineBackend:
    """Generation (continuous batching) and scoring on one loaded model.

    Args:
      model: a ReflectiveModel; cfg: its ModelConfig; tokenizer: msjax.tokenizer.Tokenizer.
      slots: decode slots (rows decoded together; a request's n <= slots); also the most texts
        scored in one call.
      chunk: decode steps between two admissions of waiting requests.
      max_len: tokens (prompt + response) per slot; default the model's context.
      mesh: the mesh the model is sharded on, or None.
    """

    def __init__(
        self, model, cfg, tokenizer, *, slots: int = 32, chunk: int = 32, max_len=None, mesh=None
    ):
        self.model, self.tokenizer = model, tokenizer
        config = SamplerConfig.from_tokenizer(tokenizer, top_p=TOP_P)
        self.engine = Engine(
            model,
            cfg,
            config,
            slots=slots,
            chunk=chunk,
            max_len=max_len or cfg.max_position_embeddings,
            mesh=mesh,
        )
        self.context = self.engine.max_len
        self.max_batch_rows = self.engine.slots
        self.session = self.engine.session(nnx.state(model))
        self._live: dict[Hashable, Generation] = {}

    def max_prompt_tokens(self) -> int:
        """The longest prompt that leaves room for one generated token."""
        return self.context - 1

    # ----------------------------------------------------------------------------- generation

    @property
    def busy(self) -> bool:
        """Requests are being decoded or wait for slots."""
        return self.session.busy

    def add(self, key: Hashable, gen: Generation) -> None:
        """Queues `gen` in the engine; its samples come back from a later `step` under `key`."""
        p = self.engine.program
        stops = [tuple(self.tokenizer.encode(s)) for s in gen.stop]
        stops = [s for s in stops if s and len(s) <= p.stop_len][: p.stop_count]
        self.session.add(
            Request(
                gen.prompt,
                n=gen.n,
                id=key,
                key=seed_key(gen.seed),
                # The engine stops at the context anyway; clamped, no buffer is sized by it.
                max_new_tokens=min(gen.max_tokens, self.context - len(gen.prompt)),
                temperature=gen.temperature,
                repetition_penalty=gen.repetition_penalty,
                stop_sequences=stops,
            )
        )
        self._live[key] = gen

    def step(self) -> list[tuple[Hashable, list[Sample]]]:
        """Runs one decode chunk; (key, samples) of the requests that completed."""
        done = []
        for key, result in self.session.step():
            gen = self._live.pop(key)
            reasons = result.finish_reasons()
            samples = []
            for j in range(gen.n):
                scores, positions = result.steps(j)
                sample = Sample(
                    tokens=result.response(j),
                    finish=reasons[j],
                    score=float(result.scores[j]),
                    step_scores=scores,
                    step_positions=positions,
                )
                samples.append(self._cut_at_stop(gen, sample))
            done.append((key, samples))
        return done

    def reset(self) -> list[Hashable]:
        """Drops every request in the engine (after a failed step); returns their keys."""
        keys = list(self._live)
        self._live.clear()
        self.session = self.engine.session(self.session.params)
        return keys

    def _cut_at_stop(self, gen: Generation, sample: Sample) -> Sample:
        """`sample` with its text, cut after the first stop string (rescored if needed)."""
        stop = find_stop(sample.tokens, gen.stop, self.decode)
        if stop is None:
            return dataclasses.replace(sample, text=self.decode(sample.tokens))
        cut, text = stop
        t = self.tokenizer
        ids = (gen.prompt, sample, cut, t.step_ids, t.think_start_id, t.think_end_id)
        shorter = steps_after_cut(*ids)
        if shorter is None:  # the cut removed the only <think>: score the shorter text afresh
            (scored,) = self.score([[*gen.prompt, *sample.tokens[:cut]]])
            # Streamed scores count delimiters of the response only (msjax.generate.steps).
            steps = [
                (p, s)
                for p, s in zip(scored["step_positions"], scored["step_scores"], strict=True)
                if p >= len(gen.prompt) - 1
            ]
            shorter = Sample(
                tokens=list(sample.tokens[:cut]),
                finish="stop",
                score=geometric_mean([s for _, s in steps]),
                step_scores=[s for _, s in steps],
                step_positions=[p for p, _ in steps],
            )
        return dataclasses.replace(shorter, finish="stop", text=text)

    # ----------------------------------------------------------------------------- scoring

    def score(self, texts: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
        """Full-forward SPRM scores of token-id lists (`msjax.scoring.score_texts`):
        [{"value", "step_scores", "step_positions"}]. Batches are padded to a power of two."""
        rows = min(1 << (len(texts) - 1).bit_length(), self.max_batch_rows)
        return score_texts(self.model, _PreTokenized(self.tokenizer), list(texts), rows)

    def decode(self, ids: Sequence[int]) -> str:
        """Response text as the original server returns it (special tokens skipped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ----------------------------------------------------------------------------- warm-up

    def warmup(self, max_tokens: int) -> None:
        """Compiles what short requests use: admitting 1, 2, 4, ... slots of short prompts,
        decoding over the KV windows that `max_tokens` reaches, and scoring 1, 2, 4, ...
        short texts. A fresh engine state compiles `admit` once more than a used one, hence
        the first round of one request."""
        prompt = (self.tokenizer.eos_id,)
        counts = [1]
        while counts[-1] < self.max_batch_rows:
            counts.append(min(2 * counts[-1], self.max_batch_rows))
        for count in [1, *counts]:
            for i in range(count):
                self.add(("warmup", i), Generation(prompt, 1, max_tokens, 0.8, i))
            while self.busy:
                self.step()
            self.score([list(prompt)] * count)


class _PreTokenized:
    """The tokenizer seen by `score_texts` when the "texts" are already token-id lists."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode_batch(self, texts):
        return [list(t) for t in texts]
