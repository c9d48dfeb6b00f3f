"""Accelerator topologies by the names users write (v5p-64, v5e-16, v6e-8, v4-32, cpu:8), with
the per-chip HBM and peak bf16 FLOP/s that the AOT planner (msjax.aot) compares against.

A TPU slice name counts what Cloud TPU counts: TensorCores for v4 and v5p (two per chip, one JAX
device per chip in megacore mode, so v5p-64 = 32 chips), chips for v5e and v6e (one core each).
Standard slice shapes grow by doubling the shortest side, last axis first:
v4 / v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ... chips;
v5e / v6e: 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16 chips.
An explicit "v5p:2x4x4" is accepted as is. "cpu:N" is N (fake) CPU devices of this host.

Chip figures (public Cloud TPU specifications, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}; HBM
in GiB per chip, its bandwidth in GB/s (10^9 bytes), dense bf16 peak per chip):

    generation   HBM      HBM bandwidth   peak bf16
    v4           32 GiB   1200 GB/s       275 TFLOP/s
    v5e          16 GiB    819 GB/s       197 TFLOP/s
    v5p          95 GiB   2765 GB/s       459 TFLOP/s
    v6e          32 GiB   1640 GB/s       918 TFLOP/s

The runtime keeps a little HBM for itself, so a program that needs nearly all of it may still
fail at run time; the planner reports the margin. GPUs (for experiments/bench_accelerator.py):
H100 / H200 989 TFLOP/s, A100 312 TFLOP/s dense bf16.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator generation: `name` as in topology strings ("v5p"), HBM bytes per chip,
    peak dense bf16 FLOP/s per chip (None: unknown), TensorCores counted per chip in slice names,
    number of topology axes, libtpu's chip configuration, HBM bandwidth in bytes/s per chip."""

    name: str
    hbm_bytes: int
    peak_flops: float | None
    cores_in_name: int
    axes: int
    chip_config: str
    hbm_bandwidth: float | None = None


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 2, 3, "megacore", 1200e9),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1, 2, "default", 819e9),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2, 3, "megacore", 2765e9),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1, 2, "default", 1640e9),
}
ALIASES = {"v5lite": "v5e", "v6lite": "v6e"}  # "v5litepod-16": the "pod" suffix is dropped
ACCEPTED = (
    "TPU slices as Cloud TPU names them: v4-8, v4-32, v5p-64, v5e-16 (or v5litepod-16), v6e-8, "
    "...; an explicit chip grid: v5p:2x4x4, v5e:4x4, v4:2x2x4, v6e:2x4; or cpu:N (N devices of "
    "this host). Generations: v4, v5e, v5p, v6e."
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A resolved topology: what the user wrote, the canonical grid ("v5p:2x4x4" or "cpu:8"),
    the chip (None for CPU) and the number of JAX devices (chips)."""

    name: str
    grid: str
    chip: Chip | None
    num_devices: int

    @property
    def is_tpu(self) -> bool:
        return self.chip is not None

    def devices(self) -> list:
        """The JAX devices to build a mesh on: compile-only TPU devices from libtpu (no TPU
        needed), or this host's CPU devices (`cpu:N` needs exactly N of them)."""
        if self.chip is None:
            devices = jax.devices("cpu")
            if len(devices) != self.num_devices:
                raise ValueError(
                    f"Topology {self.name} needs {self.num_devices} CPU devices but this process "
                    f"has {len(devices)}; start it with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={self.num_devices} (msjax-aot "
                    "does this itself when JAX has not started yet)."
                )
            return devices
        from jax.experimental import topologies

        # Compile-only devices touch no TPU, so several processes may hold libtpu at once
        # (without this, a second msjax-aot fails on libtpu's /tmp lock file).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        dims = tuple(int(d) for d in self.grid.split(":")[1].split("x"))
        bounds = _host_bounds(dims)
        topo = topologies.get_topology_desc(
            topology_name=self.grid,
            platform="tpu",
            chip_config_name=self.chip.chip_config,
            chips_per_host_bounds=bounds,
            num_slices=1,
            wrap=(False, False, False),
        )
        return list(topo.devices)

    def hbm_bytes(self) -> int:
        """Memory per device: the chip's HBM, or this host's RAM split over the CPU devices."""
        if self.chip is not None:
            return self.chip.hbm_bytes
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return ram // self.num_devices

    @property
    def peak_flops(self) -> float | None:
        """Peak bf16 FLOP/s per device (None on CPU)."""
        return None if self.chip is None else self.chip.peak_flops

    @property
    def hbm_bandwidth(self) -> float | None:
        """HBM bandwidth in bytes/s per device (None on CPU)."""
        return None if self.chip is None else self.chip.hbm_bandwidth


# JAX device_kind -> chip generation (v5p chips report "TPU v5").
_TPU_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p"}
_TPU_KINDS["TPU v6 lite"] = "v6e"
# Dense bf16 peak FLOP/s of GPUs (NVIDIA datasheets, SXM parts), by a name in device_kind.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def device_peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of a JAX device (a TPU chip or a listed GPU); None if unknown."""
    kind = device.device_kind
    if kind in _TPU_KINDS:
        return CHIPS[_TPU_KINDS[kind]].peak_flops
    return next((peak for name, peak in GPU_PEAK_FLOPS.items() if name in kind), None)


def _host_bounds(dims: tuple[int, ...]) -> tuple[int, int, int]:
    """Chips per host: 2x2x1 (4 chips) where the grid allows it, else the whole (small) grid."""
    full = (*dims, 1, 1)[:3]
    want = (2, 2, 1)
    if all(f % w == 0 for f, w in zip(full, want, strict=True)):
        return want
    return full


def standard_grid(chips: int, axes: int) -> tuple[int, ...]:
    """The standard slice shape of `chips` chips: start from 2x2x1 (3 axes) or 1x1 (2 axes) and
    double the shortest side, the last such axis first."""
    dims = [2, 2, 1] if axes == 3 else [1, 1]
    if chips < math.prod(dims) or chips & (chips - 1):
        raise ValueError(f"{chips} chips is not a standard slice size")
    while math.prod(dims) < chips:
        shortest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == shortest)
        dims[i] *= 2
    return tuple(dims)


def parse_topology(name: str) -> Topology:
    """Resolves a topology name (see module doc); ValueError listing the accepted forms."""
    text = name.strip().lower()
    m = re.fullmatch(r"cpu(?::(\d+))?", text)
    if m:
        count = int(m.group(1)) if m.group(1) else len(jax.devices("cpu"))
        if count < 1:
            raise ValueError(f"Topology {name!r}: cpu:N needs N >= 1. Accepted: {ACCEPTED}")
        return Topology(name, f"cpu:{count}", None, count)
    m = re.fullmatch(r"([a-z0-9]+?)(?:pod)?(?:-(\d+)|:(\d+(?:x\d+)*))", text)
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in CHIPS:
        raise ValueError(f"Unknown topology {name!r}. Accepted: {ACCEPTED}")
    chip = CHIPS[gen]
    if m.group(2):
        count = int(m.group(2))
        if count % chip.cores_in_name:
            raise ValueError(
                f"Topology {name!r}: {gen} slice names count TensorCores ({chip.cores_in_name} "
                f"per chip), so the number must be a multiple of {chip.cores_in_name}."
            )
        try:
            dims = standard_grid(count // chip.cores_in_name, chip.axes)
        except ValueError as e:
            raise ValueError(f"Topology {name!r}: {e}. Accepted: {ACCEPTED}") from None
    else:
        dims = tuple(int(d) for d in m.group(3).split("x"))
        if len(dims) != chip.axes or min(dims) < 1:
            raise ValueError(
                f"Topology {name!r}: {gen} grids have {chip.axes} axes, e.g. "
                f"{gen}:{'x'.join(['2'] * chip.axes)}. Accepted: {ACCEPTED}"
            )
    grid = f"{gen}:{'x'.join(str(d) for d in dims)}"
    return Topology(name, grid, chip, math.prod(dims))
