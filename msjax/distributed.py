"""Multi-process JAX runtime: start-up from the environment, process-0 logging, global batches.

One process runs per host (TPU VM worker or GPU host). Every process runs the same program:

    from msjax import distributed
    distributed.initialize()          # before any other JAX call
    ...
    batch = distributed.make_global_batch(local_numpy_batch, batch_sharding)

Where the coordinator comes from:
- explicit arguments to `initialize`, else
- `MSJAX_COORDINATOR_ADDRESS` (`host:port` of process 0), `MSJAX_NUM_PROCESSES`,
  `MSJAX_PROCESS_ID` (JAX's own `JAX_COORDINATOR_ADDRESS` is accepted for the address), else
- on a Cloud TPU VM or pod slice: JAX detects everything itself (no variables needed), else
- nothing: a single process, and `initialize` does nothing.
JAX also reads `JAX_LOCAL_DEVICE_IDS` (e.g. "0,1") to restrict a process to some local devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV_COORDINATOR = "MSJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MSJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MSJAX_PROCESS_ID"
JAX_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
# Set by the TPU runtime on GKE / multislice; a plain TPU VM is found through its PCI devices.
_TPU_ENV_MARKERS = (
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """Where this process sits in an explicitly configured multi-process run."""

    coordinator_address: str  # "host:port" of process 0's coordinator service
    num_processes: int
    process_id: int


def _parse_int(value: int | str, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer; set it to a whole number.") from None


def resolve_process_spec(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProcessSpec | None:
    """Explicit multi-process settings from arguments, then env vars; None when none is set.

    Raises ValueError naming the missing or malformed setting when only some are given.
    """
    env = os.environ if environ is None else environ
    address = coordinator_address or env.get(ENV_COORDINATOR) or env.get(JAX_ENV_COORDINATOR)
    count = env.get(ENV_NUM_PROCESSES) if num_processes is None else num_processes
    index = env.get(ENV_PROCESS_ID) if process_id is None else process_id
    sources = {ENV_COORDINATOR: address, ENV_NUM_PROCESSES: count, ENV_PROCESS_ID: index}
    given = {k: v for k, v in sources.items() if v not in (None, "")}
    if not given:
        return None
    if len(given) < len(sources):
        missing = ", ".join(k for k in sources if k not in given)
        raise ValueError(
            f"Incomplete multi-process settings: {', '.join(given)} set but {missing} not. "
            f"Set all of {', '.join(sources)} (or the matching initialize() arguments), "
            "or none of them for a single process."
        )
    address = str(address)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"{ENV_COORDINATOR}={address!r} is not 'host:port'; use e.g. '10.0.0.2:8476' "
            "(the address of process 0 and a free port)."
        )
    count = _parse_int(count, ENV_NUM_PROCESSES)
    index = _parse_int(index, ENV_PROCESS_ID)
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"{ENV_PROCESS_ID}={index} with {ENV_NUM_PROCESSES}={count}: need "
            f"{ENV_NUM_PROCESSES} >= 1 and 0 <= {ENV_PROCESS_ID} < {ENV_NUM_PROCESSES}."
        )
    return ProcessSpec(address, count, index)


def on_cloud_tpu(environ: Mapping[str, str] | None = None) -> bool:
    """True on a Cloud TPU VM / pod worker (unless JAX_PLATFORMS excludes TPU)."""
    env = os.environ if environ is None else environ
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms.split(","):
        return False
    if any(env.get(k) for k in _TPU_ENV_MARKERS):
        return True
    try:  # the PCI check JAX itself runs at start-up (private module, hence the guard)
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):
        return False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    timeout_s: int = 300,
) -> None:
    """Start JAX's multi-process runtime from arguments or the environment (see module doc).

    Call once per process before any other JAX call; later calls do nothing. A single process
    (nothing set, or 1 process) is a no-op. On CPU hosts collectives go over gloo (TCP).
    `timeout_s` bounds the wait for the other processes to connect.
    """
    if jax.distributed.is_initialized():
        return
    spec = resolve_process_spec(coordinator_address, num_processes, process_id)
    if spec is None:
        if on_cloud_tpu():
            jax.distributed.initialize(
                local_device_ids=local_device_ids, initialization_timeout=timeout_s
            )
        return
    if spec.num_processes == 1:
        return
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout_s,
    )


def process_index() -> int:
    """Index of this process, 0 .. process_count() - 1."""
    return jax.process_index()


def process_count() -> int:
    """Number of processes in the run."""
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the one that logs, writes metrics and prints."""
    return jax.process_index() == 0


class MainProcessFilter(logging.Filter):
    """Logging filter that drops records on every process but process 0.

    Before `initialize` (or in a single process) it lets everything through and never starts a
    JAX backend itself, so it is safe to install first thing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not jax.distributed.is_initialized() or jax.process_index() == 0


def log_from_main_process_only(logger: logging.Logger | None = None) -> None:
    """Install MainProcessFilter on `logger` (root by default) and on its current handlers.

    Handlers carry the filter for records propagated from child loggers (absl's handler sits on
    the root logger). Idempotent; call it after handlers are set up.
    """
    logger = logging.getLogger() if logger is None else logger
    for target in (logger, *logger.handlers):
        if not any(isinstance(f, MainProcessFilter) for f in target.filters):
            target.addFilter(MainProcessFilter())


def main_process_only(fn: _F) -> _F:
    """Decorator: run `fn` on process 0 only; other processes get None (metrics, prints)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper  # type: ignore[return-value]


def sync(name: str) -> None:
    """Barrier: block until every process reaches `sync(name)` with the same name."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def make_global_batch(local_batch: Any, sharding: jax.sharding.NamedSharding) -> Any:
    """Assemble per-process host batches into global jax.Arrays sharded by `sharding`.

    local_batch: a pytree of np.ndarray [local_batch, ...] holding THIS process's rows; every leaf
      has the same leading size.
    sharding: NamedSharding whose spec's first entry shards dim 0 over the batch mesh axes, e.g.
      `msjax.sharding.batch_sharding(mesh)`; only that entry is used, so leaves of any rank share
      it and their other dims are replicated. Processes whose devices hold the same rows (mesh
      axes outside the batch entry spanning processes) must pass identical rows.
    Returns: the same pytree of jax.Array [global_batch, ...], where global_batch is local_batch
      times the number of distinct row blocks across processes (process_count() for pure data
      parallelism). A process's rows land where its devices sit along the batch mesh axes: p-th
      when the mesh lists devices in process order.
    """
    leaves = jax.tree.leaves(local_batch)
    if not leaves:
        raise ValueError("make_global_batch got an empty batch; pass a pytree of arrays.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [np.shape(x) for x in leaves]
        raise ValueError(
            f"make_global_batch needs arrays with one shared leading batch size; got shapes "
            f"{shapes}. Give every field the same number of rows."
        )
    spec = jax.sharding.PartitionSpec(*sharding.spec[:1])
    rows_sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(rows_sharding, np.asarray(x)),
        local_batch,
    )
