"""503 and 504 over HTTP: the real app and batcher behind uvicorn on a loopback port, with a
stand-in backend whose decode steps wait on a gate (no model, nothing compiled)."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import uvicorn

from msjax.serve.app import create_app
from msjax.serve.batcher import Batcher
from msjax.serve.stops import Sample


class _Tokenizer:
    def encode(self, text):
        return [ord(c) % 50 + 1 for c in text]


class GatedBackend:
    """Each generation ends after one decode step; a step waits for `gate`."""

    max_batch_rows = 4
    context = 64

    def __init__(self):
        self.tokenizer = _Tokenizer()
        self.gate = threading.Event()
        self.live: dict = {}

    def max_prompt_tokens(self):
        return self.context - 1

    @property
    def busy(self):
        return bool(self.live)

    def add(self, key, gen):
        self.live[key] = gen

    def step(self):
        self.gate.wait(5)
        sample = Sample(tokens=[1], finish="eos", score=0.0, step_scores=[], step_positions=[])
        done = [(k, [dataclasses.replace(sample, text="ok")] * g.n) for k, g in self.live.items()]
        self.live.clear()
        return done

    def reset(self):
        self.live.clear()

    def score(self, texts):
        return [{"value": 0.0, "step_scores": [], "step_positions": []} for _ in texts]


@pytest.fixture(scope="module")
def served():
    backend = GatedBackend()
    app = create_app(backend, Batcher(backend, max_queue=1), request_timeout_s=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    yield url, backend
    backend.gate.set()
    server.should_exit = True
    thread.join(10)


def _post(url, body):
    req = urllib.request.Request(
        f"{url}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_timeout_is_504_and_a_full_queue_503(served):
    url, backend = served
    backend.gate.clear()  # decode steps hang until the gate opens
    first: dict = {}
    stuck = threading.Thread(target=lambda: first.update(r=_post(url, {"prefix_prompt": "a"})))
    stuck.start()
    for _ in range(400):  # until the first request is decoding (max_queue=1: nothing else fits)
        if backend.live:
            break
        time.sleep(0.025)
    status, body = _post(url, {"prefix_prompt": "b"})
    assert status == 503 and "--max_queue" in body["error"]
    stuck.join(10)
    status, body = first["r"]
    assert status == 504 and "--request_timeout=1.0" in body["error"]
    backend.gate.set()  # the server still answers once the backend moves again
    status, body = _post(url, {"prefix_prompt": "c", "response_num": 2})
    assert status == 200 and body == {"results": ["ok", "ok"]}
