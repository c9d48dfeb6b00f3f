"""Matmul FLOPs of a traced JAX program, with every loop counted as many times as it runs.

XLA's `compiled.cost_analysis()` counts the body of a while loop ONCE whatever its trip count
(measured with jax 0.10 / libtpu on TPU and CPU), and every `lax.scan` / `lax.map` / `while_loop`
becomes such a loop: the scan over layers, the micro-batch accumulation scan, chunked attention,
chunked log-probs, the decode loop. For msjax programs its figure is a small fraction of the work.
`jaxpr_flops` walks the jaxpr instead:

- `dot_general`: 2 x (output elements) x (contracted size);
- `scan`: its body times `length`;
- `while`: its body (and condition) times `while_trips`, which the caller states: the decode
  loop runs at most max_new_tokens - 1 times (every row running to the length limit);
- `cond`: the costliest branch;
- `shard_map`: its body, which sees one device's block, times the devices of its manual axes;
- any other primitive holding sub-jaxprs (pjit, remat, custom_jvp/vjp calls): walked once, so
  the recomputation that remat adds to a backward pass is counted: these are EXECUTED FLOPs.

Only matrix products are counted; elementwise work (norms, softmax, activations) is a few per
cent of a transformer's FLOPs and is left out. Counts are global (all devices together).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.extend as jex


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval.shape
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _open(j):
    return j.jaxpr if isinstance(j, jex.core.ClosedJaxpr) else j


def _count(jaxpr, while_trips: int | None, in_while: bool) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * _count(
                _open(eqn.params["jaxpr"]), while_trips, in_while
            )
        elif name == "while":
            if while_trips is None or in_while:
                raise ValueError(
                    "jaxpr_flops: the program has a while_loop"
                    + (" nested in another" if in_while else "")
                    + " whose trip count is unknown; pass while_trips for a single top-level loop."
                )
            body = _count(_open(eqn.params["body_jaxpr"]), while_trips, True)
            cond = _count(_open(eqn.params["cond_jaxpr"]), while_trips, True)
            total += while_trips * (body + cond)
        elif name == "shard_map":
            mesh, manual = eqn.params["mesh"], eqn.params["newly_manual_axes"]
            total += math.prod(mesh.shape[a] for a in manual) * _count(
                _open(eqn.params["jaxpr"]), while_trips, in_while
            )
        elif name == "cond":
            total += max(_count(_open(b), while_trips, in_while) for b in eqn.params["branches"])
        else:
            for sub in jex.core.jaxprs_in_params(eqn.params):
                total += _count(_open(sub), while_trips, in_while)
    return total


def jaxpr_flops(closed_jaxpr, *, while_trips: int | None = None) -> float:
    """Matmul FLOPs of a (closed) jaxpr with loop multipliers (see module doc).

    Raises ValueError for a while_loop when `while_trips` is None, or for nested while loops.
    """
    return _count(_open(closed_jaxpr), while_trips, False)


def traced_flops(fn: Callable, *args, while_trips: int | None = None) -> float:
    """`jaxpr_flops` of `fn(*args)` traced with `jax.make_jaxpr` (args may be
    jax.ShapeDtypeStruct; nothing is computed or allocated)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args), while_trips=while_trips)
