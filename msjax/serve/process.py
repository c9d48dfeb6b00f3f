"""`msjax-serve` in a subprocess on a free loopback port, waited on until warm: for the tests and
the serving benchmark."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout_s: float = 30) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ServerProcess:
    """`python -m msjax.cli.serve --model MODEL --port P FLAGS...`, started and waited on until
    GET /health answers 200; its output goes to `log`. RuntimeError (with the log's tail) when it
    exits or is not warm within timeout_s."""

    def __init__(self, model, *flags: str, log: Path, timeout_s: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        path = [str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        cmd = [sys.executable, "-m", "msjax.cli.serve", f"--model={model}"]
        cmd += [f"--port={self.port}", *flags]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"msjax-serve exited:\n{self.log_tail()}")
            try:
                if _get(self.url + "/health", 5)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"msjax-serve not warm after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stats(self) -> dict:
        """GET /stats."""
        return json.loads(_get(self.url + "/stats")[1])

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then the exit code (uvicorn re-raises the signal once it shut down cleanly,
        so a clean exit is -SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)
