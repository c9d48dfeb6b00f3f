"""`msjax-serve` started in a subprocess on a free loopback port, for the tests of tests/serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m msjax.cli.serve --model DIR --port P FLAGS...`, waited on until /health is 200."""

    def __init__(self, model: Path, *flags: str, log: Path, timeout_s: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "msjax.cli.serve", f"--model={model}"]
        cmd += [f"--port={self.port}", *flags]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"msjax-serve exited:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"msjax-serve not warm after {timeout_s} s:\n{log.read_text()[-3000:]}")

    def stats(self) -> dict:
        return requests.get(self.url + "/stats", timeout=30).json()

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then the exit code (the server must exit by itself)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def stop_gracefully(self) -> None:
        """stop(), and check the server shut down cleanly (uvicorn re-raises SIGTERM once done)."""
        code = self.stop()
        log = self.log.read_text()
        assert code == -signal.SIGTERM and "Application shutdown complete" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
