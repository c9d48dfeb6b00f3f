"""msjax.sharding.make_mesh: device order from the TPU topology (fake chips with coordinates), a
warning and the given order elsewhere, and the multi-slice (DCN) data axis."""

import logging
import random
import types

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from msjax import sharding as sh


def tpu_chips(dims=(2, 2, 2), slices=1, kind="TPU v4", seed=0):
    """Fake TPU v4 chips (one device per chip) of `slices` slices of a dims grid, shuffled."""
    chips = []
    for s in range(slices):
        for z in range(dims[2]):
            for y in range(dims[1]):
                for x in range(dims[0]):
                    chips.append(
                        types.SimpleNamespace(
                            id=len(chips), coords=(x, y, z), core_on_chip=0, device_kind=kind,
                            platform="tpu", process_index=0, slice_index=s,
                        )
                    )  # fmt: skip
    random.Random(seed).shuffle(chips)
    return chips


def differing_coords(a, b) -> set[int]:
    return {i for i in range(3) if a.coords[i] != b.coords[i]}


def axis_follows_one_physical_axis(grid, axis) -> bool:
    """Along mesh `axis`, neighbouring devices are neighbouring chips that differ in one and the
    same physical coordinate everywhere in the grid."""
    moved = set()
    for idx in np.ndindex(grid.shape):
        if idx[axis] + 1 == grid.shape[axis]:
            continue
        nxt = idx[:axis] + (idx[axis] + 1,) + idx[axis + 1 :]
        diff = differing_coords(grid[idx], grid[nxt])
        if len(diff) != 1 or abs(grid[idx].coords[min(diff)] - grid[nxt].coords[min(diff)]) != 1:
            return False
        moved |= diff
    return len(moved) == 1


def test_tpu_device_order_follows_the_chip_grid():
    chips = tpu_chips()
    grid = sh.device_grid((2, 2, 2), chips)
    assert grid.shape == (2, 2, 2)
    assert all(axis_follows_one_physical_axis(grid, a) for a in range(3))
    # The three mesh axes run over the three different physical axes.
    moved = [
        differing_coords(grid[0, 0, 0], grid[tuple(int(i == a) for i in range(3))])
        for a in range(3)
    ]
    assert set().union(*moved) == {0, 1, 2}
    # The order of the list given does not matter; the plain reshape of it (what make_mesh
    # used before, on every platform) breaks the property: this test can fail.
    again = sh.device_grid((2, 2, 2), tpu_chips(seed=1))
    assert [d.coords for d in again.flat] == [d.coords for d in grid.flat]
    plain = np.asarray(chips, dtype=object).reshape(2, 2, 2)
    assert not all(axis_follows_one_physical_axis(plain, a) for a in range(3))


def test_tpu_tensor_groups_stay_on_neighbouring_chips():
    grid = sh.device_grid((1, 2, 4), tpu_chips())
    for f in range(2):
        group = grid[0, f]
        # 4 chips of one tensor group: a 2x2 face of the cube (one z), not scattered.
        assert len({d.coords[2] for d in group}) == 1
    assert axis_follows_one_physical_axis(grid, 1)


def test_tpu_without_a_usable_topology_warns_and_keeps_the_order(caplog):
    chips = tpu_chips()[:6]  # a 2x2x2 cube with a hole: no physical mesh
    with caplog.at_level(logging.WARNING, logger="msjax.sharding"):
        grid = sh.device_grid((1, 6, 1), chips)
    assert list(grid.flat) == chips
    assert "No topology-aware order for mesh {'data': 1, 'fsdp': 6" in caplog.text
    assert "AssertionError" in caplog.text


def test_cpu_uses_the_given_order_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(sh, "_warned_platforms", set())
    with caplog.at_level(logging.WARNING, logger="msjax.sharding"):
        mesh = sh.make_mesh((2, 2, 2))
        sh.make_mesh((1, 8, 1))
    assert list(mesh.devices.flat) == jax.devices()
    assert caplog.text.count("No topology-aware device order on cpu") == 1  # once per platform


def test_multi_slice_tpu_slices_join_along_data():
    chips = tpu_chips(dims=(2, 2, 1), slices=2)
    grid = sh.device_grid((1, 2, 2), chips, dcn_data=2)
    assert grid.shape == (2, 2, 2)
    for s in range(2):
        assert {d.slice_index for d in grid[s].flat} == {s}
        assert axis_follows_one_physical_axis(grid[s : s + 1], 1)
        assert axis_follows_one_physical_axis(grid[s : s + 1], 2)


def test_dcn_data_axis_on_eight_cpu_devices(monkeypatch):
    """Two fake slices of 4 CPU devices, interleaved (slice = id % 2): data is the only axis
    that crosses slices, and the mesh computes."""
    monkeypatch.setattr(sh, "_slice_index", lambda d: d.id % 2)
    mesh = sh.make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "dcn_data": 2})
    assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    for s in range(2):
        assert {d.id % 2 for d in mesh.devices[s].flat} == {s}
    x = jax.device_put(np.arange(8.0), NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    total = jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
    assert float(total) == 28.0
    assert sh.make_mesh((-1, 1, 2), dcn_data=2).shape == {"data": 4, "fsdp": 1, "tensor": 2}


def test_dcn_data_errors_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="form one slice.*set dcn_data to the number of slices"):
        sh.make_mesh({"fsdp": -1, "dcn_data": 2})  # real CPU devices carry no slice_index
    with pytest.raises(ValueError, match="dcn_data=3 must be an int >= 1 that divides the 8"):
        sh.make_mesh((1, -1, 1), dcn_data=3)
    monkeypatch.setattr(sh, "_slice_index", lambda d: d.id // 4)
    with pytest.raises(ValueError, match="span 2 slices; set config.mesh.dcn_data=2"):
        sh.make_mesh((1, -1, 1))
    with pytest.raises(ValueError, match="dcn_data=4 but the 8 devices form 2 slices"):
        sh.make_mesh((1, -1, 1), dcn_data=4)
    with pytest.raises(ValueError, match="needs 8 devices but 4 are present per slice"):
        sh.make_mesh((1, 8, 1), dcn_data=2)


def test_decode_rules_split_no_parameter_over_fsdp():
    table = dict(sh.DECODE_RULES)
    assert table["embed"] is None
    assert {k: v for k, v in table.items() if k != "embed"} == {
        k: v for k, v in sh.RULES if k != "embed"
    }
    assert sh.logical_to_spec(("layers", "embed", "heads", "head_dim"), sh.DECODE_RULES) == (
        PartitionSpec(None, None, "tensor", None)
    )
