"""One process of the loopback multi-process test (tests/test_distributed.py runs N of these).

Reads MSJAX_COORDINATOR_ADDRESS / MSJAX_NUM_PROCESSES / MSJAX_PROCESS_ID, builds a data-parallel
batch from this process's rows, runs one jitted sharded step and prints `RESULT {json}`.
"""

import json
import logging
import sys

import numpy as np

from msjax import distributed, sharding

ROWS_PER_DEVICE = 2
FEATURES, OUTPUTS = 3, 4


def problem(num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed inputs x: f32[rows, FEATURES], y: f32[rows, OUTPUTS], w: f32[FEATURES, OUTPUTS]."""
    x = np.sin(np.arange(num_rows * FEATURES, dtype=np.float32)).reshape(num_rows, FEATURES)
    y = np.cos(np.arange(num_rows * OUTPUTS, dtype=np.float32)).reshape(num_rows, OUTPUTS)
    w = np.linspace(-1.0, 1.0, FEATURES * OUTPUTS, dtype=np.float32).reshape(FEATURES, OUTPUTS)
    return x, y, w


def main() -> None:
    distributed.initialize(timeout_s=90)
    distributed.initialize()  # a second call is a no-op

    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_default_matmul_precision", "highest")
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    distributed.log_from_main_process_only()
    logging.getLogger("msjax.child").warning("LOG-LINE from process %d", jax.process_index())

    n, p, local = distributed.process_count(), distributed.process_index(), jax.local_device_count()
    # Devices in process order: mesh axis "data" spans processes, "tensor" the local devices.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(n, local), ("data", "tensor"))
    rows = ROWS_PER_DEVICE * local
    x, y, w = problem(n * rows)
    mine = slice(p * rows, (p + 1) * rows)
    batch = distributed.make_global_batch(
        {"x": x[mine], "y": y[mine]}, NamedSharding(mesh, P("data"))
    )
    w_dev = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))

    def loss_fn(w, batch):
        h = jnp.tanh(batch["x"] @ w)  # f32[batch, outputs], sharded (data, tensor)
        return jnp.mean((h - batch["y"]) ** 2), h

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, h), grad = step(w_dev, batch)

    # The project's mesh and batch sharding: batch over (data, fsdp), fsdp spanning processes;
    # leaves of different ranks (a 1-D row weight beside x) share the batch sharding.
    fsdp_mesh = sharding.make_mesh((1, -1, 1))
    weights = np.arange(1, n * rows + 1, dtype=np.float32)
    rows_batch = distributed.make_global_batch(
        {"x": x[mine], "weight": weights[mine]}, sharding.batch_sharding(fsdp_mesh)
    )
    weighted = jax.jit(lambda b: jnp.sum(b["weight"][:, None] * b["x"]) / jnp.sum(b["weight"]))

    distributed.sync("child-step-done")
    report = distributed.main_process_only(lambda: "main")()
    result = {
        "process_index": p,
        "process_count": n,
        "device_count": jax.device_count(),
        "local_device_count": local,
        "is_main": distributed.is_main_process(),
        "main_only": report,
        "global_batch_shape": list(batch["x"].shape),
        "x": multihost_utils.process_allgather(batch["x"], tiled=True).tolist(),
        "h": multihost_utils.process_allgather(h, tiled=True).tolist(),
        "loss": float(loss),
        "grad": multihost_utils.process_allgather(grad, tiled=True).tolist(),
        "weighted_mean": float(weighted(rows_batch)),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
