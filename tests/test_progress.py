"""Progress output: a bar only on a terminal; a log gets one line per interval."""

import io
import logging

import pytest

from msjax import progress as pg


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(pg.time, "monotonic", c)
    return c


def test_line_progress_logs_once_per_interval_and_at_close(clock, caplog):
    caplog.set_level(logging.INFO, logger="msjax.progress")
    bar = pg.LineProgress(total=1000, desc="SFT", unit="step", interval_s=30.0)
    for _ in range(1000):  # 1000 updates over 100 s: lines at 30, 60, 90 s and at close
        clock.t += 0.1
        bar.update(1)
        bar.set_postfix({"ce": "0.5"})
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("SFT 300/1000 step") and "ce=0.5" in lines[0]
    assert lines[-1].startswith("SFT 1000/1000 step")
    bar.close()  # nothing new: no extra line
    assert len(caplog.records) == 4


def test_progress_is_a_bar_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(pg.sys, "stderr", io.StringIO())
    assert isinstance(pg.progress(10, "x"), pg.LineProgress)
    assert not isinstance(pg.progress(10, "x", enabled=False), pg.LineProgress)
    monkeypatch.setattr(pg.sys, "stderr", Tty())
    from tqdm import tqdm

    bar = pg.progress(10, "x")
    assert isinstance(bar, tqdm)
    bar.close()
