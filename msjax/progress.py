"""Progress of long loops (SFT, RL, sampling) for people: a tqdm bar when stderr is a terminal,
otherwise one log line per `interval_s` seconds (and one at the end), so a file or a pod log gets
a few lines instead of a bar redraw per update.

    with progress(total=1500, desc="SFT", unit="step", enabled=c.log.progress) as bar:
        for ...:
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.3f}"})
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("msjax.progress")

INTERVAL_S = 30.0


class LineProgress:
    """The bar's interface (update, set_postfix, close), written as log lines: at most one per
    `interval_s` seconds, plus a last one when closed (if anything happened since)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, interval_s=INTERVAL_S):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval_s = interval_s
        self.postfix: dict = {}
        self._start = self._last = time.monotonic()
        self._logged_n = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval_s:
            self._log()

    def set_postfix(self, postfix: dict | None = None, **kw) -> None:
        self.postfix = {**(postfix or {}), **kw}

    def close(self) -> None:
        if self.n != self._logged_n:
            self._log()

    def _log(self) -> None:
        now = time.monotonic()
        rate = (self.n - self._logged_n) / max(now - self._last, 1e-9)
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        log.info(
            "%s %d/%d %s (%.2f %s/s, %.0f s) %s",
            self.desc,
            self.n,
            self.total,
            self.unit,
            rate,
            self.unit,
            now - self._start,
            extra,
        )
        self._last, self._logged_n = now, self.n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Off:
    """No progress output at all."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, postfix: dict | None = None, **kw) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def progress(
    total: int,
    desc: str,
    unit: str = "step",
    initial: int = 0,
    enabled: bool = True,
    leave: bool = True,
    interval_s: float = INTERVAL_S,
):
    """A tqdm bar on a terminal, a `LineProgress` elsewhere, nothing when not `enabled`."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave)
    return LineProgress(total, desc, unit, initial, interval_s)
