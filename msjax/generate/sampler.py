"""The rollout engine: jitted prefill + `lax.while_loop` decode over a donated KV cache, with the
SPRM step scores streamed out of the hidden states the decoder computes anyway.

    sampler = Sampler(model, model_cfg, SamplerConfig(...), mesh=None)   # once
    result = sampler(params, prompts, n=8, key=jax.random.key(0))      # every step, live params

`params` is the model's CURRENT nnx state (`nnx.split(model)[1]`, or the model itself); the sampler
keeps only the graph definition, never a copy of the weights. The n samples of prompt p are rows
p*n .. p*n+n-1 of the result. Sample j of prompt p draws its token t from
fold_in(fold_in(key, id_p * n + j), t) with id_p = p (or the caller's `prompt_ids[p]`), so the
output depends on (key, prompts, n) and not on the mesh the batch is sharded on. With several
processes, every process passes the same (global) prompts.

Step scores: the SPRM head runs, under `lax.cond`, only on decode steps where some row emitted a
step delimiter, on the hidden state the decoder just computed; `msjax.generate.steps` explains
how the result equals the full-forward rule exactly. Rows that finish (or are pruned) keep their
batch slot until the whole batch is done; the loop stops as soon as every row is.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msjax import global_arrays
from msjax.generate.config import FINISH_REASONS, SamplerConfig
from msjax.generate.decode import DecodeProgram, decode, prefill
from msjax.generate.prompts import pack_prompts, prompt_lists
from msjax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    """Generated samples (rows = prompts * n; samples of one prompt are contiguous).

    tokens: int32[rows, N] generated ids, pad_id after the end (EOS / stop tokens included);
    logprobs: f32[rows, N] log softmax(logits / T)[token] (T = 1 when greedy; no top-k/top-p
      renormalisation; 0 after the end);
    lengths: int32[rows] generated tokens; finish: int32[rows] codes into FINISH_REASONS;
    prompt_lengths: int32[rows];
    scores: f32[rows] SPRM trajectory scores (geometric mean; 0 without steps);
    step_scores: f32[rows, S] sigmoid step scores in text order (0 after num_steps);
    step_positions: int32[rows, S] position, in prompt+response, of each scored token (-1 after);
    num_steps: int32[rows]; n: samples per prompt.
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finish: jax.Array
    prompt_lengths: jax.Array
    scores: jax.Array
    step_scores: jax.Array
    step_positions: jax.Array
    num_steps: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True), default=1)

    def to_host(self) -> SampleResult:
        """The same result with NumPy arrays (gathered from every process when multi-host)."""
        return jax.tree.map(global_arrays.to_host, self)

    def finish_reasons(self) -> list[str]:
        """Finish reason names per row: "eos", "stop", "length" or "pruned"."""
        return [FINISH_REASONS[int(c)] for c in np.asarray(self.finish)]

    def response(self, row: int) -> list[int]:
        """The generated ids of `row` (without padding)."""
        return [int(t) for t in np.asarray(self.tokens[row])[: int(self.lengths[row])]]

    def steps(self, row: int) -> tuple[list[float], list[int]]:
        """(step scores, step positions) of `row`."""
        k = int(self.num_steps[row])
        scores = np.asarray(self.step_scores[row])[:k]
        positions = np.asarray(self.step_positions[row])[:k]
        return [float(s) for s in scores], [int(p) for p in positions]

    @property
    def tokens_generated(self) -> int:
        return int(np.asarray(self.lengths).sum())


class Sampler:
    """Jitted prefill + decode for a `ReflectiveModel` graph; call it with the live parameters.

    Args:
      model: a ReflectiveModel (only its graph definition is kept) or an nnx GraphDef.
      cfg: the model's ModelConfig. config: SamplerConfig. mesh: optional (data, fsdp, tensor)
        mesh; rows are sharded over data*fsdp and heads over tensor by `msjax.sharding.RULES`.
    """

    def __init__(self, model, cfg: ModelConfig, config: SamplerConfig, mesh=None):
        self.graphdef = model if isinstance(model, nnx.GraphDef) else nnx.graphdef(model)
        self.cfg = cfg
        self.config = config
        self.mesh = mesh
        ids = [*config.eos_ids, *config.step_ids, config.pad_id]
        ids += [t for s in config.stop_sequences for t in s]
        ids += [t for t in (config.think_start_id, config.think_end_id) if t is not None]
        bad = sorted({t for t in ids if t >= cfg.vocab_size})
        if bad:
            raise ValueError(
                f"SamplerConfig token ids {bad} are outside the model's vocabulary "
                f"[0, {cfg.vocab_size}); was the config built from this model's tokenizer?"
            )
        self._row_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]

    # ----------------------------------------------------------------------------- public

    def __call__(
        self, params, prompts, *, n: int = 1, key, prompt_mask=None, prompt_ids=None
    ) -> SampleResult:
        """Generates n samples per prompt.

        Args:
          params: the model's current nnx.State (or the model itself).
          prompts: a list of token-id lists, or int32[batch, L] with `prompt_mask`
            bool[batch, L] (any padding side; None = all tokens real).
          n: samples per prompt (>= 1). key: a PRNG key (typed or raw uint32[2]).
          prompt_ids: optional distinct ints >= 0 [batch]; sample j of prompt p draws from
            fold_in(key, prompt_ids[p] * n + j) (default prompt_ids = 0..batch-1), so a caller
            that splits a dataset into batches can make samples independent of the split.
        Returns a SampleResult of batch * n rows (device arrays; `.to_host()` for NumPy).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} samples per prompt must be an int >= 1.")
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        c = self.config
        lists = prompt_lists(prompts, prompt_mask)
        tokens, lengths = pack_prompts(
            lists,
            buckets=c.prompt_buckets,
            pad_id=c.pad_id,
            vocab_size=self.cfg.vocab_size,
            max_total=self.cfg.max_position_embeddings,
            max_new_tokens=c.max_new_tokens,
            batch_multiple=self._row_shards,
        )
        rows_real = len(lists) * n
        rows = -(-rows_real // self._row_shards) * self._row_shards
        source = np.zeros((rows,), np.int32)
        source[:rows_real] = np.repeat(np.arange(len(lists)), n)
        real = np.arange(rows) < rows_real
        ids = np.arange(len(lists)) if prompt_ids is None else np.asarray(prompt_ids, np.int64)
        if ids.shape != (len(lists),) or len(set(ids.tolist())) != len(ids) or ids.min() < 0:
            raise ValueError(f"prompt_ids must be {len(lists)} distinct ints >= 0, got {ids}.")
        if (ids.max() + 1) * n > np.iinfo(np.int32).max:
            raise ValueError("prompt_ids * n must fit in int32; renumber the prompts.")
        row_ids = np.arange(rows, dtype=np.int32)
        row_ids[:rows_real] = (np.repeat(ids, n) * n + np.tile(np.arange(n), len(lists))).astype(
            np.int32
        )
        key = _threefry_key(key)
        with self._mesh_context():
            args = [self._put(x) for x in (tokens, lengths, source, real, row_ids)]
            program = DecodeProgram(self.graphdef, self.cfg, c, self.mesh, n)
            cache, state = prefill(program, params, *args, key)
            outputs, _ = decode(program, params, cache, state)
        if rows != rows_real:
            outputs = {k: v[:rows_real] for k, v in outputs.items()}
        return SampleResult(**outputs, n=n)

    # ----------------------------------------------------------------------------- internals

    def _mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _put(self, x: np.ndarray) -> jax.Array:
        return global_arrays.rows_to_global(x, self.mesh)


def _threefry_key(key) -> jax.Array:
    """A typed threefry key from a jax.random.key / PRNGKey; ValueError for anything else."""
    typed = jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else jnp.asarray(key)
    if data.shape != (2,) or not jnp.issubdtype(data.dtype, jnp.unsignedinteger):
        raise ValueError(
            f"key must be one threefry PRNG key (jax.random.key(seed) or PRNGKey(seed)); got "
            f"key data of shape {data.shape} and dtype {data.dtype}."
        )
    return jax.random.wrap_key_data(data.astype(jnp.uint32))
