"""Host data <-> global (possibly multi-process) arrays: the one place msjax crosses that line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def to_global(x: np.ndarray, sharding) -> jax.Array:
    """A global array on `sharding` from a host array that every process holds in full; each
    device receives only its own shard (no transfer of the whole array to any device)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def rows_to_global(x: np.ndarray, mesh) -> jax.Array:
    """`x` [rows, ...] with its rows sharded over the mesh's batch axes (data x fsdp); a plain
    device array when `mesh` is None."""
    if mesh is None:
        return jnp.asarray(x)
    from msjax.sharding import batch_sharding

    return to_global(x, batch_sharding(mesh, np.ndim(x)))


def to_host(x) -> np.ndarray:
    """The whole of `x` as a NumPy array on every process: a global array that spans processes
    is all-gathered; anything else (a local array, NumPy data) is copied to the host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
