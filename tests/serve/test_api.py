"""msjax-serve over HTTP (a real server in a subprocess, the `requests` client): the original
field names and types, greedy /generate against msjax-infer and transformers, /score against
msjax-score, streamed scores against /score, bad input, the original client's calling pattern."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from msjax.generate.infer import InferOptions, infer_file
from msjax.hf import load_hf
from msjax.scoring import score_texts
from msjax.tokenizer import Tokenizer

PROMPTS = ["<think> a b c", "d e <think> f g", "<think> h"]
pytestmark = pytest.mark.expensive(minutes=1.5)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return Tokenizer.from_dir(tiny_model)


def post(server, route, body, timeout=120):
    return requests.post(server.url + route, json=body, timeout=timeout)


def test_field_names_and_types(server, tok):
    body = {"prefix_prompt": PROMPTS[0], "max_tokens": 16, "response_num": 2, "seed": 1}
    r = post(server, "/generate", {**body, "temperature": 1.0})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = r.json()
    assert list(out) == ["results"]
    assert len(out["results"]) == 2 and all(isinstance(t, str) for t in out["results"])

    ext = post(server, "/generate", {**body, "temperature": 1.0, "return_scores": True}).json()
    assert list(ext) == ["results", "scores", "step_scores", "finish_reasons"]
    assert ext["results"] == out["results"]  # same seed, same samples
    assert all(isinstance(s, float) and 0 <= s <= 1 for s in ext["scores"])
    assert all(isinstance(s, list) for s in ext["step_scores"])
    assert set(ext["finish_reasons"]) <= {"eos", "stop", "length"}

    low = {"prefix_prompt": PROMPTS[1], "max_tokens": 16, "temperature": 1.0, "seed": 2}
    low = post(server, "/generate", {**low, "mode": "low", "return_scores": True}).json()
    assert len(low["results"]) == 2 and low["best"] == int(np.argmax(low["scores"]))

    text = "<think> a b .\n\n c d .\n\n e </think> f"
    s = post(server, "/score", {"text": text}).json()
    assert list(s) == ["value"] and isinstance(s["value"], float)
    full = post(server, "/score", {"text": text, "return_all_scores": True}).json()
    assert list(full) == ["value", "all_scores", "token_ids", "score_positions"]
    assert full["value"] == s["value"] and full["token_ids"] == tok.encode(text)
    assert len(full["all_scores"]) == len(full["score_positions"]) == 2
    assert all(full["token_ids"][p + 1] == tok.step_ids[0] for p in full["score_positions"])
    assert post(server, "/score", {"text": "a b c"}).json() == {"value": 0.0}
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_greedy_equals_msjax_infer_and_transformers(server, tiny_model, tok, tmp_path):
    body = {"max_tokens": 16, "response_num": 1, "temperature": 0}
    plain = [
        post(server, "/generate", {**body, "prefix_prompt": p, "repetition_penalty": 1.0})
        for p in PROMPTS
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    model, cfg = load_hf(tiny_model)
    options = InferOptions(k=1, temperature=0, max_new_tokens=16, batch_size=1)
    infer_file(model, cfg, tok, src, dst, options, progress=False)
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    for r, row in zip(plain, rows, strict=True):
        ids = row["candidates"][0]["tokens"]
        (text,) = r.json()["results"]
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert tok.encode(text) == [t for t in ids if t not in tok.eos_ids]

    # The original's fixed repetition penalty 1.05 (the server's default), against transformers.
    hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for p in PROMPTS:
        (text,) = post(server, "/generate", {**body, "prefix_prompt": p}).json()["results"]
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            ref = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
                repetition_penalty=1.05,
                eos_token_id=tok.eos_ids[0],
                pad_token_id=tok.pad_id,
            )[0, ids.shape[1] :].tolist()
        assert text == tok.decode(ref, skip_special_tokens=True)


TEXTS = [
    "q <think> a b .\n\n c .\n\n .\n\n d .\n\n e </think> f .\n\n g",
    "<think> .\n\n a .\n\n b </think>",
    "x .\n\n y <think> z .\n\n w .\n\n",
    "<think> a .\n\n <think> b .\n\n </think> c .\n\n",
    "a b c",
    "<think> " + "a b .\n\n c d .\n\n .\n\n " * 6 + "</think> e",
]


def test_score_equals_msjax_score(server, tiny_model, tok):
    model, _ = load_hf(tiny_model)
    expect = score_texts(model, tok, TEXTS, batch_size=8)
    for text, ref in zip(TEXTS, expect, strict=True):
        got = post(server, "/score", {"text": text, "return_all_scores": True}).json()
        assert got["score_positions"] == ref["step_positions"]
        np.testing.assert_allclose(got["all_scores"], ref["step_scores"], rtol=0, atol=1e-6)
        assert got["value"] == pytest.approx(ref["value"], abs=1e-6)
    assert sum(len(r["step_scores"]) for r in expect) >= 10


@pytest.mark.parametrize(
    "extra",
    [{}, {"stop": ["k", "z"]}, {"max_tokens": 11}],
    ids=["whole", "stop-strings", "max-tokens-cut"],
)
def test_streamed_scores_equal_score(server, tok, extra):
    """Scores computed while decoding equal /score's full forward on prompt + response, also
    for responses cut by stop strings or by max_tokens."""
    steps = 0
    for i, prompt in enumerate(PROMPTS):
        body = {"prefix_prompt": prompt, "max_tokens": 16, "response_num": 8, "seed": 10 + i}
        body |= {"temperature": 1.0, "return_scores": True, **extra}
        out = post(server, "/generate", body).json()
        for text, score, step_scores, reason in zip(
            out["results"], out["scores"], out["step_scores"], out["finish_reasons"], strict=True
        ):
            response = tok.encode(text)
            assert len(response) + (reason == "eos") <= extra.get("max_tokens", 16)
            if "stop" in extra and reason == "stop":
                assert text.endswith(("k", "z")) and "k" not in text[:-1] and "z" not in text[:-1]
            if "stop" in extra:
                assert reason == "stop" or not any(c in text for c in "kz")
            if "max_tokens" in extra and reason == "length":
                assert len(response) == extra["max_tokens"]
            whole = prompt + " " + text
            assert tok.encode(whole) == tok.encode(prompt) + response  # same tokens
            ref = post(server, "/score", {"text": whole, "return_all_scores": True}).json()
            np.testing.assert_allclose(step_scores, ref["all_scores"], rtol=0, atol=1e-5)
            assert score == pytest.approx(ref["value"], abs=1e-5)
            steps += len(step_scores)
    assert steps > 0, "no step was generated: the test would not test anything"


LONG = " ".join(["a"] * 300)
BAD = [
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"prefix_prompt": "a"', "not valid JSON"),
    (b'["a"]', "JSON object"),
    ({"max_tokens": 4}, "'prefix_prompt' is required"),
    ({"prefix_prompt": 5}, "'prefix_prompt' must be a string"),
    ({"prefix_prompt": ""}, "'prefix_prompt' is empty"),
    ({"prefix_prompt": "a", "max_tokens": -1}, "'max_tokens' must be >= 1"),
    ({"prefix_prompt": "a", "max_tokens": "5"}, "'max_tokens' must be an integer"),
    ({"prefix_prompt": "a", "max_tokens": True}, "'max_tokens' must be an integer"),
    ({"prefix_prompt": "a", "response_num": 0}, "'response_num' must be between 1 and 8"),
    ({"prefix_prompt": "a", "response_num": 9}, "'response_num' must be between 1 and 8"),
    ({"prefix_prompt": "a", "mode": "high"}, "above this server's limit"),
    ({"prefix_prompt": "a", "mode": "extreme"}, "'mode' must be one of"),
    ({"prefix_prompt": "a", "mode": "low", "response_num": 3}, "contradicts 'mode'"),
    ({"prefix_prompt": "a", "stop": "k"}, "'stop' must be null or a list"),
    ({"prefix_prompt": "a", "stop": [1]}, "'stop' must be null or a list"),
    ({"prefix_prompt": "a", "temperature": -1}, "'temperature' must be a number >= 0"),
    ({"prefix_prompt": "a", "temperature": "hot"}, "'temperature' must be a number >= 0"),
    ({"prefix_prompt": "a", "seed": -1}, "'seed' must be between 0"),
    ({"prefix_prompt": "a", "seed": 1.5}, "'seed' must be an integer"),
    ({"prefix_prompt": "a", "repetition_penalty": 0}, "'repetition_penalty' must be"),
    ({"prefix_prompt": "a", "return_scores": "yes"}, "'return_scores' must be true or false"),
    ({"prefix_prompt": LONG}, "'prefix_prompt' has 300 tokens, leaving no room"),
]


def test_bad_input_gets_4xx_naming_the_field(server):
    for body, message in BAD:
        kw = {"data": body} if isinstance(body, bytes) else {"json": body}
        r = requests.post(server.url + "/generate", timeout=30, **kw)
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["error"], (body, r.json())
    for body, message in [
        ({"text": 5}, "'text' must be a string"),
        ({}, "'text' is required"),
        ({"text": "a", "return_all_scores": "yes"}, "'return_all_scores' must be true"),
        ({"text": LONG}, "'text' has 300 tokens, more than the model's context of 256"),
    ]:
        r = post(server, "/score", body)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)
    r = requests.get(server.url + "/generate", timeout=30)
    assert r.status_code == 405 and "GET /generate" in r.json()["error"]
    r = requests.post(server.url + "/nowhere", json={}, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_max_tokens_beyond_the_context_stops_with_length(server, tok):
    """A prompt of 250 tokens in a 256-token context: generation stops after 6 tokens."""
    prompt = " ".join(["b"] * 250)
    body = {"prefix_prompt": prompt, "max_tokens": 10**18, "response_num": 4, "temperature": 1.0}
    out = post(server, "/generate", {**body, "seed": 3, "return_scores": True}).json()
    for text, reason in zip(out["results"], out["finish_reasons"], strict=True):
        n = len(tok.encode(text))
        assert (reason == "length" and n == 6) or (reason == "eos" and n < 6), (reason, text)
    assert "length" in out["finish_reasons"]


def test_the_original_clients_calling_pattern(server):
    """REFERENCE 5's client: response_num split over two URLs (both this server) in threads with
    random seeds < 2^32, then /score on each prompt + response."""
    urls = [server.url + "/generate", server.url + "/generate"]
    score_url = server.url + "/score"
    rng = random.Random(0)
    branch = 4
    lines = []
    for question in PROMPTS[:2]:
        results: list[list[str]] = [[] for _ in urls]

        def ask(i, url, n, seed, question=question, results=results):
            body = {"prefix_prompt": question, "max_tokens": 32768, "response_num": n}
            body |= {"stop": None, "temperature": 0.6, "seed": seed}
            r = requests.post(url, json=body, timeout=3600)
            results[i] = r.json()["results"]

        threads = [
            threading.Thread(target=ask, args=(i, url, branch // len(urls), rng.randrange(2**32)))
            for i, url in enumerate(urls)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        solutions = [question + r for rs in results for r in rs]
        scores = [
            requests.post(score_url, json={"text": s}, timeout=300).json()["value"]
            for s in solutions
        ]
        best = solutions[int(np.argmax(scores))]
        lines.append(
            {
                "prompt": question,
                "output": {"content": best, "solution_lst": solutions, "score_lst": scores},
            }
        )
    for line in lines:
        assert len(line["output"]["solution_lst"]) == branch == len(line["output"]["score_lst"])
        assert all(isinstance(s, float) and 0 <= s <= 1 for s in line["output"]["score_lst"])
        assert all(s.startswith(line["prompt"]) for s in line["output"]["solution_lst"])
