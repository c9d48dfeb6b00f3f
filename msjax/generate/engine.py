"""The continuous-batching rollout engine: a host scheduler over the compiled slot programs of
`msjax.generate.slots`.

    engine = Engine(model, model_cfg, SamplerConfig(...), slots=32)            # once
    results = engine.generate(params, [Request(prompt, n=8, id=i), ...])       # per call

A request's n samples are admitted together into n free slots (so pruning compares them at the
same decode step); the decode loop runs in jitted chunks of `chunk` steps, and between chunks the
host collects the rows that ended (EOS, stop, length, context limit, pruning) and refills their
slots with the next waiting prompts, so a call's cost follows the tokens actually generated.
Each chunk attends only over a KV window bucket that covers the longest live text. No host round
trip happens inside a chunk; per chunk the host reads one bool per slot.

Sampling settings (temperature incl. 0 = greedy, top_p, top_k, repetition_penalty,
max_new_tokens, stop sequences, key) are per request; `SamplerConfig` gives their defaults and
the engine-wide settings (EOS, pad, step and think ids, scoring, pruning, prompt buckets).
Results equal the fixed-batch `Sampler`'s: the same tokens for the same key and row ids whatever
the slot or the number of slots, log-probs and streamed step scores within float rounding.
A row stops with finish reason "length" at the model's context limit
(max_position_embeddings) or at the engine's `max_len` tokens per slot, whichever is lower.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from msjax import global_arrays
from msjax.generate import slots as sl
from msjax.generate.config import DEFAULT_BUCKETS, SamplerConfig
from msjax.generate.prompts import choose_bucket, prompt_lists
from msjax.generate.sampler import SampleResult, _threefry_key
from msjax.models.config import ModelConfig

_OVERRIDES = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop_sequences",
)


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and how to sample it.

    prompt: token ids; n: samples; id: returned with the result (any value);
    key: a PRNG key or an int seed; row_id: randomness id of sample 0 (sample j draws from
    fold_in(key, row_id + j), as the Sampler's row ids); the other fields override the engine's
    SamplerConfig for this request (None = the engine's value).
    """

    prompt: Sequence[int]
    n: int = 1
    id: Any = None
    key: Any = 0
    row_id: int = 0
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_sequences: Sequence[Sequence[int]] | None = None


@dataclasses.dataclass
class _Live:
    """A request in flight: its resolved settings, slots and the rows collected so far."""

    request: Request
    settings: SamplerConfig
    limit: int
    key_data: np.ndarray
    slots: list[int]
    group: int = -1
    rows: dict[int, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)


def window_buckets(max_len: int) -> tuple[int, ...]:
    """Default KV windows: the DEFAULT_BUCKETS below max_len, then max_len."""
    return tuple(b for b in DEFAULT_BUCKETS if b < max_len) + (max_len,)


class Engine:
    """Continuous batching over `slots` decode slots of `max_len` tokens each.

    Args:
      model: a ReflectiveModel (only its graph is kept) or an nnx GraphDef; cfg: its ModelConfig.
      config: defaults for the per-request settings and the engine-wide ones.
      slots: decode slots (a multiple of the mesh's data * fsdp size; a request's n <= slots).
      chunk: decode steps per compiled chunk between two scheduler passes.
      max_len: text tokens (prompt + response) per slot; default the largest prompt bucket +
        max_new_tokens, capped at the model's max_position_embeddings.
      windows: KV window buckets (ascending, the last = max_len); default `window_buckets`.
      stop_capacity: (sequences, tokens) per request's stop sequences.
      mesh: optional (data, fsdp, tensor) mesh; slots are sharded like the Sampler's rows.
    """

    def __init__(
        self,
        model,
        cfg: ModelConfig,
        config: SamplerConfig,
        *,
        slots: int = 16,
        chunk: int = 32,
        max_len: int | None = None,
        windows: Sequence[int] | None = None,
        stop_capacity: tuple[int, int] = (4, 8),
        mesh=None,
    ):
        graphdef = model if isinstance(model, nnx.GraphDef) else nnx.graphdef(model)
        shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        if not isinstance(slots, int) or slots < 1 or slots % shards:
            raise ValueError(
                f"slots={slots!r} must be a positive multiple of {shards} (row shards)."
            )
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} must be an int >= 1 (decode steps per chunk).")
        limit = cfg.max_position_embeddings
        if max_len is None:
            max_len = min(limit, max(config.prompt_buckets) + config.max_new_tokens)
        if not isinstance(max_len, int) or not 2 <= max_len <= limit:
            raise ValueError(
                f"max_len={max_len!r} tokens per slot must be in [2, {limit}] "
                "(the model's max_position_embeddings)."
            )
        windows = window_buckets(max_len) if windows is None else tuple(sorted(windows))
        if windows[-1] != max_len or windows[0] < 1:
            raise ValueError(f"windows={windows} must be positive and end with max_len={max_len}.")
        stop_count, stop_len = stop_capacity
        stop_len = max([stop_len, *(len(s) for s in config.stop_sequences)])
        stop_count = max(stop_count, len(config.stop_sequences))
        ids = [*config.eos_ids, *config.step_ids, config.pad_id]
        ids += [t for t in (config.think_start_id, config.think_end_id) if t is not None]
        bad = sorted({t for t in ids if t >= cfg.vocab_size})
        if bad:
            raise ValueError(
                f"SamplerConfig token ids {bad} are outside the model's vocabulary "
                f"[0, {cfg.vocab_size}); was the config built from this model's tokenizer?"
            )
        self.cfg, self.config, self.mesh, self.chunk, self.windows = (
            cfg,
            config,
            mesh,
            chunk,
            windows,
        )
        # The per-request defaults do not shape the programs: engines that differ only there
        # share their compiled programs.
        engine_wide = config.replace(**{k: getattr(SamplerConfig, k) for k in _OVERRIDES})
        self.program = sl.SlotProgram(
            graphdef, cfg, engine_wide, mesh, slots, max_len, stop_count, stop_len
        )

    @property
    def slots(self) -> int:
        return self.program.slots

    @property
    def max_len(self) -> int:
        return self.program.max_len

    def generate(self, params, requests: Iterable[Request]) -> list[SampleResult]:
        """Runs `requests` to completion; one host SampleResult per request, in request order
        (rows = its n samples; tokens/logprobs [n, its max_new_tokens])."""
        session = self.session(params)
        requests = list(requests)
        for i, r in enumerate(requests):
            session.add(dataclasses.replace(r, id=i))
        out: list[SampleResult | None] = [None] * len(requests)
        while session.busy:
            for rid, result in session.step():
                out[rid] = result
        return out  # type: ignore[return-value]

    def session(self, params) -> Session:
        """A scheduler on `params` to which requests can be added between steps (a server)."""
        return Session(self, params)

    def resolve(self, request: Request) -> _Live:
        """Validates a request (ValueError naming the field) and resolves its settings."""
        name = f"request {request.id!r}"
        n = request.n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.slots:
            raise ValueError(f"{name}: n={n!r} must be an int in [1, {self.slots}] (the slots).")
        if isinstance(request.prompt, str):
            raise ValueError(f"{name}: the prompt is a string; encode it with the tokenizer first.")
        prompt = [int(t) for t in request.prompt]
        if not prompt:
            raise ValueError(f"{name}: the prompt is empty; it needs at least one token.")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise ValueError(
                f"{name}: the prompt holds a token id outside the model's vocabulary "
                f"[0, {self.cfg.vocab_size})."
            )
        room = self.max_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"{name}: the prompt has {len(prompt)} tokens and leaves no room in the "
                f"{self.max_len} tokens of a slot (the model's context or the engine's max_len)."
            )
        overrides = {k: getattr(request, k) for k in _OVERRIDES if getattr(request, k) is not None}
        try:
            settings = self.config.replace(**overrides)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        stops = settings.stop_sequences
        p = self.program
        if len(stops) > p.stop_count or any(len(s) > p.stop_len for s in stops):
            raise ValueError(
                f"{name}: {len(stops)} stop sequences of up to {max(map(len, stops))} tokens; "
                f"the engine holds {p.stop_count} of up to {p.stop_len} (Engine stop_capacity)."
            )
        if any(t >= self.cfg.vocab_size for s in stops for t in s):
            raise ValueError(f"{name}: a stop sequence holds a token id outside the vocabulary.")
        if isinstance(request.key, int):
            key = jax.random.key(request.key)
        else:
            key = _threefry_key(request.key)
        row_id = request.row_id
        if not isinstance(row_id, int) or row_id < 0 or row_id + n > np.iinfo(np.int32).max:
            raise ValueError(
                f"{name}: row_id={row_id!r} must be an int >= 0 with row_id + n < 2^31."
            )
        request = dataclasses.replace(request, prompt=prompt)
        limit = min(settings.max_new_tokens, room)
        return _Live(request, settings, limit, np.asarray(jax.random.key_data(key)), [])

    def mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def put(self, x: np.ndarray) -> jax.Array:
        """A host array onto the device(s), rows sharded like the slots."""
        return global_arrays.rows_to_global(x, self.mesh)


class Session:
    """The scheduler of one `Engine` on fixed parameters: `add` requests at any time, call `step`
    while `busy`; each step admits waiting requests into free slots (FIFO), runs one chunk and
    returns the requests that completed as (id, host SampleResult)."""

    def __init__(self, engine: Engine, params):
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        self.engine, self.params = engine, params
        self.waiting: collections.deque[_Live] = collections.deque()
        self.live: dict[int, _Live] = {}  # group -> request in flight
        self.free_slots = list(range(engine.slots))
        self.free_groups = list(range(engine.slots))
        self.slot_pos = np.zeros((engine.slots,), np.int64)  # text length bound per slot
        self.chunks = 0
        with engine.mesh_context():
            self.cache, self.state = sl.init(engine.program)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.live)

    def add(self, request: Request) -> None:
        """Queues a request (validated now: ValueError naming the request and field)."""
        self.waiting.append(self.engine.resolve(request))

    def step(self) -> list[tuple[Any, SampleResult]]:
        eng = self.engine
        admitted = []
        while self.waiting and len(self.free_slots) >= self.waiting[0].request.n:
            live = self.waiting.popleft()
            live.slots = [self.free_slots.pop(0) for _ in range(live.request.n)]
            live.group = self.free_groups.pop(0)
            self.live[live.group] = live
            admitted.append(live)
        with eng.mesh_context():
            if admitted:
                self._admit(admitted)
            if not self.live:
                return []
            running = [
                s for live in self.live.values() for s in live.slots if s not in self._done(live)
            ]
            need = int(self.slot_pos[running].max()) + eng.chunk if running else 1
            window = next((w for w in eng.windows if w >= need), eng.max_len)
            self.cache, self.state = sl.run_chunk(
                eng.program, self.params, self.cache, self.state, window, eng.chunk
            )
            self.chunks += 1
            self.slot_pos[running] += eng.chunk
            return self._collect()

    # ----------------------------------------------------------------------------- internals

    @staticmethod
    def _done(live: _Live) -> set[int]:
        return {live.slots[j] for j in live.rows}

    def _admit(self, admitted: list[_Live]) -> None:
        eng, p = self.engine, self.engine.program
        s = p.slots
        lens = [len(live.request.prompt) for live in admitted]
        width = min(choose_bucket(max(lens), (*eng.config.prompt_buckets, p.max_len)), p.max_len)
        # Prompt rows: a power of two, rounded up to the row shards.
        count = -(-(1 << (len(admitted) - 1).bit_length()) // self._shards) * self._shards
        prompts = np.full((count, width), eng.config.pad_id, np.int32)
        plen = np.ones((count,), np.int32)
        rows = dict(
            slot=np.full((s,), s, np.int32),
            source=np.zeros((s,), np.int32),
            limit=np.ones((s,), np.int32),
            temperature=np.zeros((s,), np.float32),
            top_p=np.ones((s,), np.float32),
            penalty=np.ones((s,), np.float32),
            top_k=np.zeros((s,), np.int32),
            base_keys=np.zeros((s, 2), np.uint32),
            row_id=np.zeros((s,), np.int32),
            stops=np.full((s, p.stop_count, p.stop_len), sl.ANY_TOKEN, np.int32),
            group=np.full((s,), s, np.int32),
            member=np.zeros((s,), np.int32),
        )
        r = 0
        for i, live in enumerate(admitted):
            prompt, c = live.request.prompt, live.settings
            prompts[i, : len(prompt)], plen[i] = prompt, len(prompt)
            for j, slot in enumerate(live.slots):
                rows["slot"][r], rows["source"][r], rows["limit"][r] = slot, i, live.limit
                rows["temperature"][r], rows["top_p"][r] = c.temperature, c.top_p
                rows["penalty"][r], rows["top_k"][r] = c.repetition_penalty, c.top_k
                rows["base_keys"][r], rows["row_id"][r] = live.key_data, live.request.row_id + j
                for k, seq in enumerate(c.stop_sequences):
                    rows["stops"][r, k, p.stop_len - len(seq) :] = seq
                rows["group"][r], rows["member"][r] = live.group, j
                self.slot_pos[slot] = len(prompt)
                r += 1
        batch = sl.AdmitBatch(
            prompts=eng.put(prompts),
            prompt_len=eng.put(plen),
            **{k: eng.put(v) for k, v in rows.items()},
        )
        self.cache, self.state = sl.admit(p, self.params, self.cache, self.state, batch)

    @property
    def _shards(self) -> int:
        m = self.engine.mesh
        return 1 if m is None else m.shape["data"] * m.shape["fsdp"]

    def _collect(self) -> list[tuple[Any, SampleResult]]:
        running = _host(self.state.running)
        ended = [
            (live, j, slot)
            for live in self.live.values()
            for j, slot in enumerate(live.slots)
            if j not in live.rows and not running[slot]
        ]
        if not ended:
            return []
        outputs = jax.tree.map(_host, sl.collect(self.engine.program, self.state))
        completed = []
        for live, j, slot in ended:
            live.rows[j] = {k: v[slot] for k, v in outputs.items()}
            self.free_slots.append(slot)
        for group, live in list(self.live.items()):
            if len(live.rows) == live.request.n:
                del self.live[group]
                self.free_groups.append(group)
                completed.append((live.request.id, _result(live)))
        self.free_slots.sort()
        return completed


def _host(x: jax.Array) -> np.ndarray:
    """A device array on the host (gathered from every process when multi-host)."""
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class EngineSampler:
    """The `Sampler`'s call signature on the continuous engine: a drop-in for the trainer,
    msjax-infer and test-time scaling. Any number of prompts per call go through `slots`
    slots; prompt p's sample j draws from fold_in(key, prompt_ids[p] * n + j) as in the Sampler,
    so the same key gives the same tokens. Returns one host SampleResult (rows = prompts * n).

    One Engine (one set of compiled programs) per slot length = prompt bucket + max_new_tokens.
    """

    def __init__(
        self, model, cfg: ModelConfig, config: SamplerConfig, mesh=None, *, slots=32, chunk=32
    ):
        self.graphdef = model if isinstance(model, nnx.GraphDef) else nnx.graphdef(model)
        self.cfg, self.config, self.mesh = cfg, config, mesh
        self.slots, self.chunk = slots, chunk
        self._engines: dict[tuple[int, int], Engine] = {}

    def __call__(
        self, params, prompts, *, n: int = 1, key, prompt_mask=None, prompt_ids=None
    ) -> SampleResult:
        """See `Sampler.__call__`; rows stop at the model's context limit with "length"."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} samples per prompt must be an int >= 1.")
        lists = prompt_lists(prompts, prompt_mask)
        if not lists:
            raise ValueError("no prompts given; pass at least one prompt.")
        ids = np.arange(len(lists)) if prompt_ids is None else np.asarray(prompt_ids, np.int64)
        if ids.shape != (len(lists),) or len(set(ids.tolist())) != len(ids) or ids.min() < 0:
            raise ValueError(f"prompt_ids must be {len(lists)} distinct ints >= 0, got {ids}.")
        bucket = choose_bucket(max(len(p) for p in lists), self.config.prompt_buckets)
        max_len = min(self.cfg.max_position_embeddings, bucket + self.config.max_new_tokens)
        shards = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        slots = -(-max(self.slots, n) // shards) * shards
        engine = self._engines.get((max_len, slots))
        if engine is None:
            engine = Engine(
                self.graphdef,
                self.cfg,
                self.config,
                slots=slots,
                chunk=self.chunk,
                max_len=max_len,
                mesh=self.mesh,
            )
            self._engines[(max_len, slots)] = engine
        key = _threefry_key(key)
        requests = [
            Request(p, n=n, id=i, key=key, row_id=int(ids[i]) * n) for i, p in enumerate(lists)
        ]
        results = engine.generate(params, requests)
        return jax.tree.map(lambda *x: np.concatenate(x), *results)


def _result(live: _Live) -> SampleResult:
    """The request's rows as a host SampleResult (widths of its own max_new_tokens)."""
    c = live.settings
    width, cap = c.max_new_tokens, c.step_capacity if c.score_steps else 0
    rows = [live.rows[j] for j in range(live.request.n)]

    def stack(name, cols=None):
        x = np.stack([r[name] for r in rows])
        if cols is None:
            return x
        have = min(cols, x.shape[1])
        fill = c.pad_id if name == "tokens" else (-1 if name == "step_positions" else 0)
        out = np.full((x.shape[0], cols), fill, x.dtype)
        out[:, :have] = x[:, :have]
        return out

    return SampleResult(
        tokens=stack("tokens", width),
        logprobs=stack("logprobs", width),
        lengths=stack("lengths"),
        finish=stack("finish"),
        prompt_lengths=stack("prompt_lengths"),
        scores=stack("scores"),
        step_scores=stack("step_scores", cap),
        step_positions=stack("step_positions", cap),
        num_steps=stack("num_steps"),
        n=live.request.n,
    )
