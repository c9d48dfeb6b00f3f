"""The train step compiled for a TPU topology (libtpu compile-only devices, fsdp = 4,
2 micro-batches, 4 log-prob chunks), tied and untied embeddings: collectives on the [vocab, embed]
matrices, by loop depth (0 = once per update, 1 = per micro-batch, 2 = per log-prob chunk inside
the chunk scan).

Issue 14 item 2: the LM-head gradient (tied: the table's unembedding gradient) is reduce-scattered
onto its fsdp shards once per micro-batch, never all-reduced at full size, and the embedding
lookup's gradient needs no collective on [vocab, embed] at all (msjax.models.qwen2.embed_lookup).
Measured beyond this test, in the 1.5B recipe's program for v5p-16 (fsdp = 8, 4 micro-batches):
the embedding's all-gather and f32 all-reduce are gone, but libtpu lowers the LM head's
reduce-scatter on that 2 x 2 x 2 torus as a full f32 all-reduce + slice per micro-batch, tied or
untied (on v5p-8 it is a reduce-scatter, as here)."""

import collections
import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments.configs.tiny import get_config
from msjax import aot
from msjax import sharding as sh
from msjax.rl import config as rlc
from msjax.rl import train_step as ts
from msjax.rl.optimizer import make_optimizer
from msjax.topology import parse_topology

VOCAB, EMBED, FSDP = 4096, 64, 4
KINDS = ("all-reduce", "reduce-scatter", "all-gather")
_CALLS = re.compile(r"(body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_COLLECTIVE = re.compile(r"= (.+?) (all-reduce|reduce-scatter|all-gather)(?:-start)?\(")
_SHAPE = re.compile(r"\w+\[([\d,]+)\]")


def _computations(text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = re.match(r"(?:ENTRY )?%?([\w.\-]+)", line).group(1)
            comps[name] = []
        elif name and line.startswith("  "):
            comps[name].append(line)
    return comps


def collective_counts(hlo_text: str, shapes) -> dict[tuple[str, int], int]:
    """{(kind, loop depth): count} of the all-reduces, reduce-scatters and all-gathers in an
    optimized HLO module whose result holds one of the 2-D matrices `shapes` ([vocab, embed]) in
    any layout XLA gives it: an array with as many elements and a dimension that is a multiple
    of the first size (e.g. [embed, vocab], or [fsdp, vocab, embed / fsdp] as [fsdp * vocab,
    embed / fsdp]). Loop depth = how many while bodies enclose the op's computation; an
    all-reduce inside a fused "all-reduce-scatter" computation (TPU's all-reduce + slice) counts
    as a reduce-scatter."""
    comps = _computations(hlo_text)
    depth: dict[str, int] = collections.defaultdict(int)
    stack = [(re.search(r"^ENTRY %?([\w.\-]+)", hlo_text, re.M).group(1), 0)]
    seen = set()
    while stack:
        name, d = stack.pop()
        if (name, d) in seen:
            continue
        seen.add((name, d))
        depth[name] = max(depth[name], d)
        for line in comps.get(name, ()):
            for attr, callees in _CALLS.findall(line):
                stack += [(c, d + (attr == "body")) for c in re.findall(r"[\w.\-]+", callees)]
    counts = collections.Counter()
    for name, lines in comps.items():
        for line in lines:
            m = _COLLECTIVE.search(line)
            found = m and [tuple(map(int, s.split(","))) for s in _SHAPE.findall(m.group(1))]
            if found and any(_is_one_of(s, shapes) for s in found):
                kind = m.group(2)
                if kind == "all-reduce" and "reduce-scatter" in name:
                    kind = "reduce-scatter"
                counts[(kind, depth[name])] += 1
    return dict(counts)


def _is_one_of(shape: tuple[int, ...], shapes) -> bool:
    return any(
        math.prod(shape) == math.prod(s) and any(d % s[0] == 0 for d in shape) for s in shapes
    )


def test_collective_counts_on_hand_written_hlo():
    hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %r = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (x: f32[8,4]) -> f32[2,4] {
  %ar = f32[8,4]{1,0} all-reduce(%x), to_apply=%add
  ROOT %s = f32[2,4]{1,0} dynamic-slice(%ar, %i, %j), dynamic_slice_sizes={2,4}
}

%inner (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %g = bf16[4,8]{1,0} all-gather(%w), dimensions={0}
  %f = f32[2,4]{1,0} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.1
  %other = f32[3,3]{1,0} all-reduce(%z), to_apply=%add
}

%outer (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %w2 = (s32[], f32[8,4]) while(%p), condition=%cond, body=%inner
  %t = (f32[8,4]{1,0}, f32[]) all-reduce(%q, %r), to_apply=%add
  %rs = f32[1,8,1]{2,1,0} reduce-scatter(%u), dimensions={0}, to_apply=%add
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %w1 = (s32[], f32[8,4]) while(%t), condition=%cond, body=%outer
  %ag = f32[8,4]{1,0} all-gather-start(%a), dimensions={0}
}
"""
    assert collective_counts(hlo, [(8, 4), (8, 1)]) == {
        ("all-gather", 0): 1,
        ("all-reduce", 1): 1,  # the tuple all-reduce that holds an f32[8, 4]
        ("reduce-scatter", 1): 1,  # [fsdp, vocab, embed / fsdp] onto its shard f32[8, 1]
        ("all-gather", 2): 1,  # bf16[4, 8]: the transpose counts
        ("reduce-scatter", 2): 1,
    }


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hlo_text(request):
    c = get_config()
    c.model.update(vocab_size=VOCAB, hidden_size=EMBED, tie_word_embeddings=request.param)
    # 112 positions: 4 chunks of 28 (no chunk's logits [rows, 28, vocab] can hold as many
    # elements as [vocab, embed] or a shard of it, so `collective_counts` never counts them).
    c.loss.logprob_chunk = 28
    c.workdir = "unused"
    mesh = sh.make_mesh(dict(c.mesh), parse_topology("v5e-4").devices())
    assert dict(mesh.shape) == {"data": 1, "fsdp": FSDP, "tensor": 1}
    rlc.validate(c, batch_shards=FSDP)
    loss_cfg, tx = rlc.loss_config(c), make_optimizer(rlc.optimizer_config(c))
    assert loss_cfg.num_microbatches == 2
    graphdef, abstract = aot.abstract_model(rlc.model_config(c), mesh)
    param_sh = nnx.to_pure_dict(sh.state_shardings(abstract, mesh))
    params = aot._abstract(nnx.to_pure_dict(abstract), param_sh)
    abstract_state = jax.eval_shape(lambda p: ts.init_train_state(p, tx, c.seed), params)
    state_sh = ts.train_state_shardings(abstract_state, param_sh, mesh)
    seq = c.data.max_prompt_len + c.rollout.max_new_tokens
    rows = c.train.ppo_mini_batch * c.rollout.group_size
    env = aot._Env(mesh, graphdef, None, loss_cfg, params, param_sh, seq)
    dtypes = dict(tokens=jnp.int32, positions=jnp.int32, old_logp=jnp.float32)
    dtypes.update(ref_logp=jnp.float32, advantages=jnp.float32, labels=jnp.float32)
    batch = {
        k: env._rows(rows, 1 if k in ("advantages", "labels") else 2, dtypes.get(k, bool))
        for k in ts.BATCH_KEYS
    }
    step = ts.make_train_step(graphdef, tx, loss_cfg, mesh=mesh, state_shardings=state_sh)
    state = aot._abstract(abstract_state, state_sh)
    return step.lower(state, batch).compile().as_text()


def test_vocab_by_embed_collectives_run_once_per_micro_batch(hlo_text):
    counts = collective_counts(hlo_text, [(VOCAB, EMBED), (VOCAB, EMBED // FSDP)])
    # Nothing on the [vocab, embed] matrices inside the log-prob chunk scan (depth 2) ...
    assert all(depth < 2 for _, depth in counts), counts
    # ... no all-reduce of a [vocab, embed] gradient: the embedding lookup's gradient is formed
    # in the table's shards (no collective), and the LM head's (tied: the table's unembedding
    # gradient) is reduce-scattered, once per micro-batch.
    assert not any(kind == "all-reduce" for kind, _ in counts), counts
    assert counts.get(("reduce-scatter", 1)) == 1, counts
