"""Test-session setup: CPU only, 8 fake host devices for the sharding tests, and a persistent
XLA compilation cache shared by the xdist workers and the child processes the tests start (the
same small programs are compiled many times; the cache cuts the suite's time several-fold).

The environment must be set before jax is imported anywhere, so it lives here.
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "expensive(minutes): a module of minutes of work on the 2-core CI machine; such modules "
        "are scheduled first, the longest first",
    )


def _minutes(item) -> float:
    mark = item.get_closest_marker("expensive")
    return mark.kwargs["minutes"] if mark else 0.0


def pytest_collection_modifyitems(items):
    """Modules marked `expensive` first, the longest first; each module's tests in collection
    order. pyproject.toml runs the suite with `--dist=loadfile --no-loadscope-reorder`: each
    module on one xdist worker (its module-scoped fixtures -- a pipeline run, a server, compiled
    programs -- built once, not once per worker), modules handed out in this order, so that no
    long module starts last while the other worker idles."""
    items.sort(key=lambda item: -_minutes(item))
