"""msjax.topology: slice names as Cloud TPU writes them -> chip grids, devices, HBM and peak."""

import jax
import pytest

from msjax.topology import CHIPS, GIB, device_peak_flops, parse_topology, standard_grid

# (name, grid, devices): Cloud TPU's published slice shapes.
SLICES = [
    ("v4-8", "v4:2x2x1", 4),
    ("v4-32", "v4:2x2x4", 16),
    ("v4-128", "v4:4x4x4", 64),
    ("v5p-16", "v5p:2x2x2", 8),
    ("v5p-64", "v5p:2x4x4", 32),
    ("v5p-256", "v5p:4x4x8", 128),
    ("v5p-1024", "v5p:8x8x8", 512),
    ("v5e-1", "v5e:1x1", 1),
    ("v5e-4", "v5e:2x2", 4),
    ("v5litepod-16", "v5e:4x4", 16),
    ("v5e-256", "v5e:16x16", 256),
    ("v6e-8", "v6e:2x4", 8),
    ("v6e-64", "v6e:8x8", 64),
    ("V5P:2x4x4", "v5p:2x4x4", 32),
    ("v6e:4x8", "v6e:4x8", 32),
]


@pytest.mark.parametrize(("name", "grid", "devices"), SLICES)
def test_slice_names_resolve_to_the_published_grids(name, grid, devices):
    t = parse_topology(name)
    assert (t.grid, t.num_devices, t.is_tpu) == (grid, devices, True)
    assert t.hbm_bytes() == CHIPS[grid.split(":")[0]].hbm_bytes


def test_standard_grids_double_the_shortest_side():
    assert [standard_grid(2**k, 2) for k in range(9)] == [
        (1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)
    ]  # fmt: skip
    assert [standard_grid(4 * 2**k, 3) for k in range(5)] == [
        (2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4)
    ]  # fmt: skip


def test_chip_table():
    assert {k: (c.hbm_bytes // GIB, c.peak_flops / 1e12) for k, c in CHIPS.items()} == {
        "v4": (32, 275.0),
        "v5e": (16, 197.0),
        "v5p": (95, 459.0),
        "v6e": (32, 918.0),
    }
    # HBM bandwidth, GB/s per chip (Cloud TPU system architecture pages).
    assert {k: c.hbm_bandwidth / 1e9 for k, c in CHIPS.items()} == {
        "v4": 1200.0,
        "v5e": 819.0,
        "v5p": 2765.0,
        "v6e": 1640.0,
    }
    assert parse_topology("v5p-16").hbm_bandwidth == 2765e9
    assert parse_topology("cpu:8").hbm_bandwidth is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("v3-8", "Unknown topology 'v3-8'"),
        ("tpu", "Unknown topology"),
        ("v5p-63", "multiple of 2"),
        ("v5e-3", "3 chips is not a standard slice size"),
        ("v5p:2x4", "v5p grids have 3 axes"),
        ("cpu:0", "cpu:N needs N >= 1"),
    ],
)
def test_bad_names_list_the_accepted_forms(name, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_topology(name)
    assert "v5p-64" in str(e.value) or "multiple of 2" in str(e.value)
    assert "cpu:N" in str(e.value) or "multiple of 2" in str(e.value)


def test_compile_only_tpu_devices_one_per_chip():
    for name, kind in (("v5e-4", "TPU v5 lite"), ("v4-8", "TPU v4")):
        devices = parse_topology(name).devices()
        assert len(devices) == 4 and {d.device_kind for d in devices} == {kind}


def test_cpu_topology_uses_this_hosts_devices():
    t = parse_topology("cpu:8")  # tests/conftest.py gives this process 8 CPU devices
    assert (t.is_tpu, t.peak_flops, t.devices()) == (False, None, jax.devices("cpu"))
    assert 0 < t.hbm_bytes() * 8 <= 1 << 50
    with pytest.raises(ValueError, match="needs 4 CPU devices but this process has 8"):
        parse_topology("cpu:4").devices()


def test_peak_flops_of_a_device():
    class Gpu:
        device_kind = "NVIDIA H100 80GB HBM3"

    kinds = {n: parse_topology(n).devices()[0] for n in ("v5e-4", "v4-8", "v5p-8", "v6e-4")}
    peaks = {n: device_peak_flops(d) for n, d in kinds.items()}
    assert peaks == {"v5e-4": 197e12, "v4-8": 275e12, "v5p-8": 459e12, "v6e-4": 918e12}
    assert device_peak_flops(Gpu()) == 989e12
    assert device_peak_flops(jax.devices("cpu")[0]) is None
