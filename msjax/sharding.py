"""The device mesh, the logical-axis rules, and the helpers that turn logical axes into shardings.

Every parameter and activation is annotated with LOGICAL axis names (batch, seq, embed, heads,
kv_heads, head_dim, mlp, vocab, ...). `RULES` maps them onto the three MESH axes
(data, fsdp, tensor) in exactly one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("cache_seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("head_hidden", "tensor"),
    ("head_out", None),
    ("norm", None),
    ("layers", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
)


def make_mesh(
    shape: Sequence[int] | dict[str, int] = (1, -1, 1),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh.

    Args:
      shape: sizes for (data, fsdp, tensor), as a sequence or a dict; one entry may be -1
        (take all remaining devices).
      devices: defaults to `jax.devices()` (all processes' devices).
    Raises ValueError naming the sizes when they do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, dict):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"Unknown mesh axis {unknown}; the axes are {MESH_AXES}.")
        shape = [int(shape.get(a, 1)) for a in MESH_AXES]
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"Mesh shape needs 3 sizes for {MESH_AXES}, got {shape}.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"Mesh shape {shape}: sizes must be positive, at most one -1.")
    n = len(devices)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ValueError(
                f"Mesh shape {dict(zip(MESH_AXES, shape, strict=True))} cannot fill {n} devices."
            )
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} devices "
            f"but {n} are present; change config.mesh so the sizes multiply to {n}."
        )
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - CPU or odd topologies: plain reshape is fine.
        dev_array = np.asarray(devices).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(dev_array, MESH_AXES, axis_types=auto)


def logical_to_spec(axes: Sequence[str | None] | None, rules=RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ValueError(f"Logical axis {name!r} has no sharding rule; add it to RULES.")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state, rules=RULES):
    """PartitionSpec tree for an nnx State whose Variables carry `axes` metadata."""

    def spec(v):
        axes = v.get_metadata().get("axes")
        if axes is not None and len(axes) != len(v.shape):
            raise ValueError(f"axes {axes} do not match shape {v.shape}.")
        return v.replace(logical_to_spec(axes, rules))

    return jax.tree.map(spec, state, is_leaf=_is_var)


def state_shardings(state, mesh: Mesh, rules=RULES):
    """NamedSharding tree for an nnx State (abstract or concrete)."""
    specs = state_specs(state, rules)
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, v.get_value())), specs, is_leaf=_is_var
    )


def check_divisible(state, mesh: Mesh, rules=RULES) -> None:
    """Raises ValueError naming the parameter when a mesh axis does not divide its dimension."""
    flat = nnx.to_flat_state(state)
    for path, v in flat:
        spec = logical_to_spec(v.get_metadata().get("axes"), rules)
        for dim, (size, entry) in enumerate(zip(v.shape, tuple(spec), strict=False)):
            axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                name = "/".join(str(p) for p in path)
                raise ValueError(
                    f"Parameter {name} dim {dim} (size {size}) is sharded over mesh axes {axes} "
                    f"of total size {parts}, which does not divide it; change config.mesh."
                )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding for a [batch, ...] array: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, axes: Sequence[str | None], rules=RULES) -> jax.Array:
    """`with_sharding_constraint` by logical axes; a no-op when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, rules)
    spec = PartitionSpec(
        *[
            e
            if e is None or all(a in mesh.axis_names for a in ((e,) if isinstance(e, str) else e))
            else None
            for e in spec
        ]
    )
    return jax.lax.with_sharding_constraint(x, spec)
