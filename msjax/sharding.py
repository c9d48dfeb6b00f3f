"""The device mesh, the logical-axis rules, and the helpers that turn logical axes into shardings.

Every parameter and activation is annotated with LOGICAL axis names (batch, seq, embed, heads,
kv_heads, head_dim, mlp, vocab, ...). `RULES` maps them onto the three MESH axes
(data, fsdp, tensor) in exactly one place; `DECODE_RULES` is the layout of the rollout engine's
copy of the weights (msjax.generate.weights): the same, except that no parameter is split over
fsdp, so decoding never gathers a weight.

The mesh's device order follows the platform's topology where it has one (TPU: neighbouring
mesh positions are neighbouring chips, slices joined over the data axis by DCN); elsewhere it is
the order of `jax.devices()`, with a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# config.mesh may also hold this key: the number of slices (joined by DCN) along `data`.
DCN_DATA = "dcn_data"

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
# The decode copy of the weights: tensor-parallel, replicated over data and fsdp (rows of the
# batch still split over data x fsdp), so every chip holds its tensor shard of every weight.
DECODE_RULES: tuple[tuple[str, Any], ...] = tuple(
    (name, None if name == "embed" else target) for name, target in RULES
)
_warned_platforms: set[str] = set()


def make_mesh(
    shape: Sequence[int] | dict[str, int] = (1, -1, 1),
    devices: Sequence[jax.Device] | None = None,
    *,
    dcn_data: int = 1,
) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh.

    Args:
      shape: sizes for (data, fsdp, tensor) within one slice, as a sequence or a dict (a dict
        may also give `dcn_data`); one entry may be -1 (take all remaining devices).
      devices: defaults to `jax.devices()` (all processes' devices).
      dcn_data: number of slices (multi-slice TPU, joined by the data-center network) along the
        data axis; the mesh's data axis then has dcn_data x data devices.
    Raises ValueError naming the sizes when they do not multiply to the device count, or when
    the devices' slices do not match dcn_data.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, dict):
        unknown = sorted(set(shape) - {*MESH_AXES, DCN_DATA})
        if unknown:
            raise ValueError(
                f"Unknown mesh axis {unknown}; the axes are {MESH_AXES} (and {DCN_DATA!r})."
            )
        dcn_data = int(shape.get(DCN_DATA, dcn_data))
        shape = [int(shape.get(a, 1)) for a in MESH_AXES]
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"Mesh shape needs 3 sizes for {MESH_AXES}, got {shape}.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"Mesh shape {shape}: sizes must be positive, at most one -1.")
    slices = _slices(devices)
    if isinstance(dcn_data, bool) or dcn_data < 1 or len(devices) % dcn_data:
        raise ValueError(
            f"config.mesh.{DCN_DATA}={dcn_data!r} must be an int >= 1 that divides the "
            f"{len(devices)} devices (one per slice joined over the data-center network)."
        )
    if dcn_data > 1 and len(slices) != dcn_data:
        found = f"{len(slices)} slices" if len(slices) > 1 else "one slice (no slice_index)"
        raise ValueError(
            f"config.mesh.{DCN_DATA}={dcn_data} but the {len(devices)} devices form {found}; "
            f"set {DCN_DATA} to the number of slices."
        )
    if dcn_data == 1 and len(slices) > 1:
        raise ValueError(
            f"The {len(devices)} devices span {len(slices)} slices; set "
            f"config.mesh.{DCN_DATA}={len(slices)} so that only the data axis crosses slices."
        )
    n = len(devices) // dcn_data
    sizes = dict(zip(MESH_AXES, shape, strict=True))
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ValueError(f"Mesh shape {sizes} cannot fill {n} devices per slice.")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} devices "
            f"but {n} are present{' per slice' if dcn_data > 1 else ''}; change config.mesh so "
            f"the sizes multiply to {n}."
        )
    grid = device_grid(shape, devices, dcn_data)
    auto = (jax.sharding.AxisType.Auto,) * 3
    return Mesh(grid, MESH_AXES, axis_types=auto)


def _slice_index(device) -> int:
    return getattr(device, "slice_index", 0)


def _slices(devices) -> dict:
    """slice index -> devices (one entry when the devices carry no slice_index)."""
    out: dict = {}
    for d in devices:
        out.setdefault(_slice_index(d), []).append(d)
    return out


def device_grid(shape: Sequence[int], devices: Sequence, dcn_data: int = 1) -> np.ndarray:
    """The devices arranged as an array of `shape` (data axis times dcn_data).

    TPU: from the chips' physical coordinates (`mesh_utils.create_device_mesh`, or
    `create_hybrid_device_mesh` with the slices along data), so each mesh axis runs over
    neighbouring chips. Other platforms have no topology to follow: the devices in the order
    given (GPUs by id), with a warning once per platform.
    """
    shape = tuple(shape)
    full = (shape[0] * dcn_data, *shape[1:])
    platform = devices[0].platform
    if platform == "tpu":
        try:
            if dcn_data > 1:
                return mesh_utils.create_hybrid_device_mesh(
                    shape, (dcn_data, 1, 1), devices, allow_split_physical_axes=True
                )
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError) as e:
            log.warning(
                "No topology-aware order for mesh %s on these TPU devices (%s: %.200s); the "
                "mesh uses the devices in the order given, which may slow collectives.",
                dict(zip(MESH_AXES, full, strict=True)),
                type(e).__name__,
                e,
            )
    elif len(devices) > 1 and platform not in _warned_platforms:
        _warned_platforms.add(platform)
        log.warning(
            "No topology-aware device order on %s: the mesh uses the devices in %s order.",
            platform,
            "id" if platform == "gpu" else "the given",
        )
    if platform == "gpu":
        devices = sorted(devices, key=lambda d: d.id)
    groups = _slices(devices)
    ordered = [d for k in sorted(groups) for d in groups[k]]  # slices along data
    return np.asarray(ordered, dtype=object).reshape(full)


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
    return jax.lax.with_sharding_constraint(x, spec_on_mesh(axes, mesh, rules))


def spec_on_mesh(axes: Sequence[str | None], mesh, rules=RULES) -> PartitionSpec:
    """`logical_to_spec`, with None for each entry that names an axis `mesh` does not have."""
    return PartitionSpec(
        *[
            e
            if e is None or all(a in mesh.axis_names for a in ((e,) if isinstance(e, str) else e))
            else None
            for e in logical_to_spec(axes, rules)
        ]
    )
