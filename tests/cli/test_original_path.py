"""The original work's path as a new user takes it: a Qwen2 folder with an R1-Distill-style chat
template and score_module.pt, msjax-infer's --preset official settings on the original's files
(AIME {prompt, answer} JSONL, verl parquet, C-Eval JSON list, written here in their exact
schemas): rendered prompts, gold answers carried, every grade against a plain re-statement of the
original's rules, and the summary's Best-of-N over disjoint groups recomputed from the rows."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "hf"))
sys.path.insert(0, str(TESTS / "rewards"))
from official_reference import reference_reward  # noqa: E402
from tiny_hf import build_hf, write_r1_tokenizer  # noqa: E402

from msjax import checkpoint  # noqa: E402
from msjax.generate.infer import InferOptions, infer_file, summary_table  # noqa: E402
from msjax.rewards.outcome import OutcomeReward  # noqa: E402
from msjax.tokenizer import Tokenizer  # noqa: E402

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def r1_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("r1")
    vocab = write_r1_tokenizer(path)
    build_hf(path, vocab=len(vocab), seed=5)
    return path


def original_files(root: Path) -> dict[str, tuple[list, list[str]]]:
    """Writes the three files; returns {name: (user messages, gold answers)}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    aime = [("a b c" + SUFFIX, "1"), ("d e" + SUFFIX, "2")]
    (root / "aime24.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in aime)
    )
    verl = [("f g", "1"), ("h i j", "3")]
    pq.write_table(
        pa.table(
            {
                "data_source": ["aime24"] * 2,
                "prompt": [[{"role": "user", "content": q}] for q, _ in verl],
                "ability": ["math"] * 2,
                "reward_model": [{"style": "rule", "ground_truth": {"target": a}} for _, a in verl],
                "extra_info": [{"index": i, "split": "test"} for i in range(2)],
            }
        ),
        root / "aime.parquet",
    )
    ceval = [("k l 答案：A", "A"), ("m n", "C")]
    (root / "ceval.json").write_text(
        json.dumps([{"model_input": q, "answer": a} for q, a in ceval], ensure_ascii=False)
    )
    return {"aime24.jsonl": aime, "aime.parquet": verl, "ceval.json": ceval}


def ceval_rule(text, gold):
    """REFERENCE 9: the first `(?i)(?:答案|answer)\\s*[:：]\\s*([A-Da-d])` match, any case."""
    found = re.search(r"(?i)(?:答案|answer)\s*[:：]\s*([A-Da-d])", text)
    return (found.group(1).lower() if found else "") == gold.lower()


def test_preset_official_on_the_original_files(r1_folder, tmp_path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(r1_folder)
    tok = Tokenizer.from_dir(r1_folder)
    checkpoint.require_trained_head(r1_folder)  # score_module.pt is there
    model, cfg = checkpoint.load_any(r1_folder)
    options = InferOptions.official(k=4, max_new_tokens=12, batch_size=2, seed=1)
    reward = OutcomeReward(tok, options.reward, options.manager, workers=1)  # shared by the runs
    try:
        for name, problems in original_files(tmp_path).items():
            out = tmp_path / f"{name}.out.jsonl"
            summary = infer_file(
                model, cfg, tok, tmp_path / name, out, options, progress=False, reward=reward
            )
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(rows) == len(problems) and summary["skipped"] == 0
            picks = []
            for row, (question, gold) in zip(rows, problems, strict=True):
                messages = [{"role": "user", "content": question}]
                rendered = reference.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
                assert row["prompt"] == rendered and rendered.endswith("<｜Assistant｜><think>\n")
                assert row["gold"] == gold and len(row["candidates"]) == 4
                for c in row["candidates"]:
                    if name == "ceval.json":  # the letter rule on the prompt + response
                        want = ceval_rule(row["prompt"] + c["response"], gold)
                    else:  # the original's rule on prompt + response with special tokens
                        text = tok.decode(tok.encode(row["prompt"]) + c["tokens"])
                        want = reference_reward(text, gold, "naive") > 0.5
                    assert c["correct"] == want, (name, c["response"])
                scores = [c["score"] for c in row["candidates"]]
                picks += [
                    row["candidates"][g + int(np.argmax(scores[g : g + 2]))]["correct"]
                    for g in (0, 2)
                ]
            assert summary["groups"]["2"] == {"bon": pytest.approx(np.mean(picks)), "groups": 2}
            assert f"N= 2: BoN {np.mean(picks):.4f}" in summary_table(summary)
    finally:
        reward.close()
    # The C-Eval letter in the first prompt makes every candidate of it right.
    first = json.loads((tmp_path / "ceval.json.out.jsonl").read_text().splitlines()[0])
    assert all(c["correct"] for c in first["candidates"])
