"""A bounded load test of msjax-serve (a real server in a subprocess): 16 concurrent clients x 10
requests with different settings, mixed with malformed requests and clients that hang up
mid-request. Every good request gets exactly the responses it gets alone (a row's samples do not
depend on what is decoded with it), every bad one a 400, the server survives, its memory stays
flat and nothing compiles after warm-up (request settings are per-row values, not programs)."""

from __future__ import annotations

import itertools
import json
import random
import socket
import threading

import requests

CLIENTS, REQUESTS = 16, 10
PROMPTS = ["<think> a b c", "d e <think> f g", "<think> h", "i j k <think>"]
SEEDS = range(1, 4)
SETTINGS = [  # (temperature, max_tokens, repetition_penalty, stop)
    (0.8, 8, 1.05, None),
    (0.0, 6, 1.0, ("q",)),
    (1.3, 4, 1.2, ("k", "z")),
]
BAD = [
    b'{"prefix_prompt": "a", ',
    b'{"prefix_prompt": "a", "max_tokens": -4}',
    b'{"prefix_prompt": "a", "response_num": 0}',
    b'{"prefix_prompt": "\xff\xfe"}',
    b'{"prefix_prompt": ["a"]}',
]


def body(prompt, seed, n, settings):
    temperature, max_tokens, penalty, stop = settings
    return {
        "prefix_prompt": prompt,
        "max_tokens": max_tokens,
        "response_num": n,
        "seed": seed,
        "temperature": temperature,
        "repetition_penalty": penalty,
        "stop": None if stop is None else list(stop),
    }


def hang_up(port, payload: bytes, times: int) -> None:
    """Sends (part of) a request and closes the connection without reading the answer."""
    for _ in range(times):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)


def test_load(server):
    combos = list(itertools.product(PROMPTS, SEEDS, (1, 2), SETTINGS))
    url = server.url + "/generate"
    before = server.stats()
    # Every good request alone first: the expected answers.
    expect = {c: requests.post(url, json=body(*c), timeout=120).json()["results"] for c in combos}
    assert all(len(v) == c[2] for c, v in expect.items())
    mid = server.stats()

    outcomes: list[tuple[str, bool, str]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(i)
        with requests.Session() as session:
            for j in range(REQUESTS):
                if (i + j) % 4 == 3:
                    r = session.post(url, data=BAD[(i + j) % len(BAD)], timeout=120)
                    ok = r.status_code == 400 and "error" in r.json()
                    kind = "bad"
                else:
                    c = rng.choice(combos)
                    r = session.post(url, json=body(*c), timeout=120)
                    ok = r.status_code == 200 and r.json()["results"] == expect[c]
                    kind = "good"
                with lock:
                    outcomes.append((kind, ok, r.text[:200]))

    whole = json.dumps(body(PROMPTS[0], 1, 4, SETTINGS[0])).encode()
    request = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    full = request + f"Content-Length: {len(whole)}\r\n\r\n".encode() + whole
    partial = request + f"Content-Length: {len(whole) + 50}\r\n\r\n".encode() + whole
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    threads += [
        threading.Thread(target=hang_up, args=(server.port, full, 5)),
        threading.Thread(target=hang_up, args=(server.port, partial, 5)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(outcomes) == CLIENTS * REQUESTS
    failed = [o for o in outcomes if not o[1]]
    assert not failed, failed[:5]
    assert sum(kind == "bad" for kind, _, _ in outcomes) == 40

    after = server.stats()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert server.proc.poll() is None
    assert after["compiles"] == before["compiles"], "a request compiled a new program"
    # Batching happened: alone, each of the 80 good requests takes one decode chunk.
    assert after["calls"] - mid["calls"] < 80
    assert after["rss_mb"] - mid["rss_mb"] < 64, (mid, after)
