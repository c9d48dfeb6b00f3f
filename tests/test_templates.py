"""The prompt renderer: chat templates byte for byte against transformers' apply_chat_template
(a DeepSeek-R1-Distill-style and a QwQ/ChatML-style template, restated here), the text
templates, the default rule and clear errors."""

import json
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as Backend
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "hf"))
from tiny_hf import R1_TEMPLATE  # noqa: E402

from msjax.templates import ChatTemplate, render_prompt  # noqa: E402
from msjax.tokenizer import MATH_SUFFIX, Tokenizer  # noqa: E402

# QwQ / ChatML style, with trim_blocks-sensitive line breaks inside the blocks.
CHATML_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
        {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n<think>\\n' }}
{%- endif %}
"""
# transformers' extras: {% generation %} blocks, tojson (no HTML escaping), loop controls.
EXTRAS_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{{ m.role | tojson }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{% endgeneration %}{% else %}{{ m.content | tojson }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ eos_token }}assistant:{% endif %}"
)
SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|im_start|>", "<|im_end|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 1+1? " + MATH_SUFFIX}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<b>{a}</b> & 中。"}],
    [
        {"role": "user", "content": "  spaces kept  \n"},
        {"role": "assistant", "content": "<think>\nhmm.\n\n</think>\n\n\\boxed{2}"},
        {"role": "user", "content": "And 2+2?"},
    ],
]


def _folder(path, template, *, as_file):
    vocab = {t: i for i, t in enumerate(SPECIAL + ["a", "[UNK]"])}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL])
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL[0],
        "eos_token": SPECIAL[1],
    }
    if as_file:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {
        "r1": _folder(root / "r1", R1_TEMPLATE, as_file=False),
        "chatml": _folder(root / "chatml", CHATML_TEMPLATE, as_file=True),
        "extras": _folder(root / "extras", EXTRAS_TEMPLATE, as_file=False),
    }


@pytest.mark.parametrize("name", ["r1", "chatml", "extras"])
def test_chat_equals_transformers_byte_for_byte(folders, name):
    reference = AutoTokenizer.from_pretrained(folders[name])
    chat = ChatTemplate.of(Tokenizer.from_dir(folders[name]))
    for messages in CONVERSATIONS:
        want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_prompt(messages, kind="chat", template="chat", chat=chat) == want
    # A problem is the user message with the suffix, a prompt the user message as it is.
    problem = reference.apply_chat_template(
        [{"role": "user", "content": "What is 1+1? " + MATH_SUFFIX}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert render_prompt(" What is 1+1?\n", chat=chat) == problem
    prompt = "What is 1+1?\nPlease reason step by step."
    assert render_prompt(prompt, kind="prompt", chat=chat) == reference.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def test_known_renderings(folders):
    """The two templates give the formats of REFERENCE section 9."""
    r1 = ChatTemplate.of(Tokenizer.from_dir(folders["r1"]))
    chatml = ChatTemplate.of(Tokenizer.from_dir(folders["chatml"]))
    assert render_prompt("Q", kind="prompt", chat=r1) == (
        "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>\n"
    )
    assert render_prompt("Q", kind="prompt", chat=chatml) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )


def test_save_keeps_the_template(folders, tmp_path):
    tok = Tokenizer.from_dir(folders["chatml"])
    assert tok.chat_template_file.endswith("chat_template.jinja")
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.chat_template == CHATML_TEMPLATE


def test_text_templates_and_the_default_rule(folders):
    assert render_prompt("2+2?", template="plain") == "2+2? " + MATH_SUFFIX + "\n<think>\n"
    assert render_prompt("2+2?", template="none", suffix=None) == "2+2?"
    assert render_prompt(" x ", kind="prompt", template="none") == " x "
    user = [{"role": "user", "content": "x"}]
    assert render_prompt(user, kind="chat", template="r1") == (
        "<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜><think>\n"
    )
    # Without a chat template: prompts verbatim, problems and conversations in "r1".
    assert render_prompt("p", kind="prompt") == "p"
    r1 = "<｜begin▁of▁sentence｜><｜User｜>p<｜Assistant｜><think>\n"
    assert render_prompt("p", suffix="") == r1
    chat = ChatTemplate.of(Tokenizer.from_dir(folders["chatml"]))
    assert render_prompt("p", kind="prompt", chat=chat).startswith("<|im_start|>user\np")


def test_errors_name_the_problem(folders, tmp_path):
    chat = ChatTemplate.of(Tokenizer.from_dir(folders["r1"]))
    with pytest.raises(ValueError, match="have none.*choose --template"):
        render_prompt("x", template="chat")
    bad_role = [{"role": "narrator", "content": "x"}]
    with pytest.raises(ValueError, match="message 0 has the unknown role 'narrator'"):
        render_prompt(bad_role, kind="chat", chat=chat)
    with pytest.raises(ValueError, match="message 1 .user. needs a text 'content'"):
        render_prompt(
            [{"role": "system", "content": "s"}, {"role": "user"}], kind="chat", chat=chat
        )
    two = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    with pytest.raises(ValueError, match=r"2 messages .*only with --template chat"):
        render_prompt(two, kind="chat", template="plain")
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        render_prompt("x", template="chatml")
    failing = ChatTemplate("{{ raise_exception('only user turns') }}", "my/tokenizer_config.json")
    with pytest.raises(ValueError, match="my/tokenizer_config.json failed to render.*only user"):
        render_prompt("x", chat=failing)
    with pytest.raises(ValueError, match="x.jinja does not compile"):
        ChatTemplate("{% if %}", "x.jinja")
    folder = _folder(tmp_path / "multi", "", as_file=False)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "t"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="without a 'default' one"):
        Tokenizer.from_dir(folder)
