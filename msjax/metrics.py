"""Training metrics: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL log, a progress
bar. Only process 0 writes; other processes get a writer that does nothing."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax


class MetricsWriter:
    """Writes scalar metrics of each step to <workdir>/metrics.jsonl and TensorBoard events.

    The JSONL file is appended to, so a resumed run continues the same log.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(root / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(root / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Logs `metrics` (name -> float) at `step`; non-finite values are kept as strings."""
        if not self.enabled:
            return
        row = {"step": step, "time": time.time()}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None:
                self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The rows of <workdir>/metrics.jsonl (empty when absent)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
