"""Tokenizer wrapper: special ids from config files, step ids, save + transformers round trip."""

import json

import pytest
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from msjax.data.synthetic_tokenizer import build_synthetic_tokenizer
from msjax.tokenizer import MATH_SUFFIX, Tokenizer, chinese_step_ids, render_prompt

TEXTS = [
    "<｜begin▁of▁sentence｜><｜User｜>Start with 7. Add 5. "
    + MATH_SUFFIX
    + "<｜Assistant｜><think>\n",
    "7 + 5 = 12.\n\n12 * 3 = 36.\n\n</think>\n\nThe answer is \\boxed{36}.<｜end▁of▁sentence｜>",
    "héllo wörld,  12.\n\n\n 中文。\n  tabs\tand ünïcödé 🙂 \\frac{1}{2}",
]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_synthetic_tokenizer(path)
    return path


def test_render_prompt_templates():
    assert render_prompt(" 2+2? ", "r1") == (
        "<｜begin▁of▁sentence｜><｜User｜>2+2? " + MATH_SUFFIX + "<｜Assistant｜><think>\n"
    )
    assert render_prompt("2+2?", "plain") == "2+2? " + MATH_SUFFIX + "\n<think>\n"
    assert render_prompt("2+2?", "plain", suffix=None) == "2+2?\n<think>\n"
    assert render_prompt("a {b}", "plain", suffix="") == "a {b}\n<think>\n"
    with pytest.raises(ValueError, match=r"unknown template 'chatml'.*r1.*plain"):
        render_prompt("x", "chatml")


def test_from_dir_reads_special_ids(synthetic_dir):
    tok = Tokenizer.from_dir(synthetic_dir)
    b = tok.backend
    assert tok.eos_ids == (b.token_to_id("<｜end▁of▁sentence｜>"),)
    assert tok.bos_id == b.token_to_id("<｜begin▁of▁sentence｜>")
    assert tok.pad_id == b.token_to_id("<｜▁pad▁｜>")
    assert tok.think_start_id == b.token_to_id("<think>") is not None
    assert tok.think_end_id == b.token_to_id("</think>") is not None
    assert tok.step_ids == (b.token_to_id(".ĊĊ"),)
    assert tok.vocab_size == b.get_vocab_size(with_added_tokens=True) < 400


def test_from_dir_eos_list_and_pad_fallback(synthetic_dir, tmp_path):
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((synthetic_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<｜end▁of▁sentence｜>"}})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4, 2]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_ids == (2, 4)
    assert tok.pad_id == 2  # no pad token: the first EOS
    assert tok.bos_id is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json.*'<nope>'"):
        Tokenizer.from_dir(tmp_path)


def test_missing_files_give_clear_errors(tmp_path, synthetic_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((synthetic_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="no EOS token"):
        Tokenizer.from_dir(tmp_path)


def _word_level(vocab: list[str]) -> Backend:
    b = Backend(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    b.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # characters
    return b


def test_multi_token_delimiter_needs_explicit_step_ids():
    b = _word_level(["[UNK]", ".", "\n", "</s>"])  # ".\n\n" is not one token here
    with pytest.raises(ValueError, match="encodes to .* tokens.*step_ids"):
        Tokenizer(b, eos_ids=[3])
    tok = Tokenizer(b, eos_ids=[3], step_ids=[1])
    assert tok.step_ids == (1,)
    with pytest.raises(ValueError, match="step_ids"):
        Tokenizer(b, eos_ids=[3], step_ids=[99])


def test_chinese_step_mode_follows_the_32b_rule():
    vocab = ["[UNK]", "\n", "。", "ab\n", "abcd\n", "x。", "abc", "好。\n\n", "</s>"]
    vocab += ["\n\n", "。\n", ")\n", "\n。\n", "a\nb", "。。", "x\n\n", "xy。", "。ab"]
    b = _word_level(vocab)
    # By hand: at most 3 characters, and "\n" (or "。") with at most one other character left.
    expected = (1, 2, 5, 9, 10, 11, 12, 14, 15)
    assert chinese_step_ids(b) == expected
    tok = Tokenizer(b, eos_ids=[8], step_mode="chinese")
    assert tok.step_ids == expected
    with pytest.raises(ValueError, match="step_mode"):
        Tokenizer(b, eos_ids=[8], step_mode="klingon")


def test_chinese_step_ids_on_a_byte_level_vocabulary():
    tok = build_synthetic_tokenizer()  # byte-level BPE, as Qwen2's
    b = tok.backend
    special = {j for j, t in b.get_added_tokens_decoder().items() if t.special}
    expected = []
    for i in range(b.get_vocab_size(with_added_tokens=True)):
        text = b.decode([i], skip_special_tokens=False)
        if i in special or len(text) > 3:
            continue
        for mark in ("\n", "。"):
            if mark in text and len([c for c in text if c != mark]) <= 1:
                expected.append(i)
                break
    got = chinese_step_ids(b)
    assert got == tuple(expected)
    (delimiter,) = tok.encode(".\n\n")  # one "other" character: a delimiter in this mode too
    (newline,) = tok.encode("\n")
    assert delimiter in got and newline in got
    (long,) = tok.encode("{}.\n")  # two other characters
    assert long not in got


def test_save_round_trips_with_transformers(synthetic_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_dir(synthetic_dir)
    ours.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf(text)["input_ids"] == ours.encode(text, add_special_tokens=True)
        assert hf.decode(ids) == ours.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(
            ids, skip_special_tokens=True
        )
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (
        ours.eos_id,
        ours.bos_id,
        ours.pad_id,
    )
    again = Tokenizer.from_dir(tmp_path)
    assert (again.eos_ids, again.bos_id, again.pad_id, again.step_ids) == (
        ours.eos_ids,
        ours.bos_id,
        ours.pad_id,
        ours.step_ids,
    )


def test_step_mode_is_a_validated_recipe_field(synthetic_dir):
    from msjax.rl.config import default_config, validate

    c = default_config()
    c.workdir = "/tmp/unused"
    assert c.step_mode == "default"
    c.step_mode = "chinese"
    validate(c)  # the trainer then loads its tokenizer folder with Tokenizer.from_dir(step_mode=)
    tok = Tokenizer.from_dir(synthetic_dir, step_mode=c.step_mode)
    assert tok.step_ids == chinese_step_ids(tok.backend)
    c.step_mode = "zh"
    with pytest.raises(ValueError, match="config.step_mode='zh' must be one of"):
        validate(c)
    c.step_mode, c.tokenizer = "chinese", "synthetic"
    with pytest.raises(ValueError, match="step_mode applies to tokenizer folders"):
        validate(c)
