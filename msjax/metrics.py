"""Training metrics: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL log, a progress
bar. Only process 0 writes; other processes get a writer that does nothing."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
from etils import epath


class MetricsWriter:
    """Writes scalar metrics of each step to <workdir>/metrics.jsonl and TensorBoard events.

    A local JSONL file is appended to, so a resumed run continues the same log. Object stores
    (gs://) cannot append: there each start of the run writes its own metrics-<time>.jsonl,
    rewritten after every step; `read_metrics` merges them. TensorBoard events go to
    <workdir>/tensorboard, or to `tensorboard_dir` (needed for a gs:// workdir, since
    tensorboardX writes local files).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        tensorboard_dir: str | os.PathLike | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._rows: list[str] = []
        if not self.enabled:
            return
        remote = "://" in os.fspath(workdir)
        root = epath.Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        if remote:
            self._remote_file = root / f"metrics-{int(time.time())}.jsonl"
        else:
            self._jsonl = open(Path(workdir) / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard and (tensorboard_dir or not remote):
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.fspath(tensorboard_dir or Path(workdir) / "tensorboard"))

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
        line = json.dumps(row) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            self._rows.append(line)
            self._remote_file.write_text("".join(self._rows))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The rows of <workdir>/metrics*.jsonl in file-name order (empty when there is none)."""
    rows = []
    for path in sorted(epath.Path(workdir).glob("metrics*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows
