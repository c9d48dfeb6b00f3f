"""Tiny random Hugging Face Qwen2 folders (built with transformers, never downloaded) for tests.

Every parameter is randomised (norm scales and q/k/v biases too: HF initialises those to 1 and
0, which would hide a transposed or mis-mapped tensor).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config

SPECIAL = ["<pad>", "<eos>", "<think>", "</think>", ".\n\n"]
# DeepSeek-R1-Distill style: BOS, the system prompt first, <｜User｜> / <｜Assistant｜> turns, the
# reasoning of earlier assistant turns dropped, the generation prompt ending with "<think>\n".
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
R1_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
R1_ADDED = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", ".\n\n", "\\boxed{1}"]
WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
VOCAB = 64


def build_hf(
    path: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 48,
    vocab: int = VOCAB,
    tied: bool = False,
    rope_theta: float = 10000.0,
    rope_linear: float | None = None,
    rms_norm_eps: float = 1e-6,
    seed: int = 0,
    head: bool = True,
):
    """Saves a random Qwen2ForCausalLM (+ score_module.pt when `head`) to `path`.

    Returns (torch model in eval mode, nn.Sequential head or None).
    """
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_linear is not None:
        rope = {"rope_type": "linear", "factor": rope_linear, "rope_theta": rope_theta}
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        rms_norm_eps=rms_norm_eps,
        max_position_embeddings=256,
        rope_parameters=rope,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_((0.5 if p.ndim == 1 else 1.0 / hidden**0.5) * torch.randn_like(p))
    model.save_pretrained(path)
    seq = None
    if head:
        seq = sprm_sequential(hidden, seed)
        torch.save(seq.state_dict(), Path(path) / "score_module.pt")
    return model, seq


def sprm_sequential(hidden: int, seed: int = 0) -> nn.Sequential:
    """The original head: Linear(C, 2C), ReLU, Dropout(0.5), Linear(2C, 1), random, eval mode."""
    torch.manual_seed(seed + 1000)
    seq = nn.Sequential(
        nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * hidden, 1)
    )
    with torch.no_grad():
        for p in seq.parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 1.0 / p.shape[1] ** 0.5))
    return seq.eval()


def to_v4_layout(path: Path) -> dict:
    """Rewrites config.json in the transformers 4 layout (top-level rope_theta / rope_scaling,
    torch_dtype, no rope_parameters / dtype / layer_types). Returns the new dict."""
    cfg_path = Path(path) / "config.json"
    d = json.loads(cfg_path.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope["rope_theta"]
    d["rope_scaling"] = (
        None if rope["rope_type"] == "default" else {"type": "linear", "factor": rope["factor"]}
    )
    d["torch_dtype"] = d.pop("dtype")
    d.pop("layer_types", None)
    d["transformers_version"] = "4.51.0"
    cfg_path.write_text(json.dumps(d, indent=2))
    return d


def write_tokenizer(path: Path) -> dict[str, int]:
    """A word-level tokenizer whose ".\\n\\n", "<think>", "</think>" are single tokens, plus
    tokenizer_config.json (eos/pad). Returns the vocabulary."""
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in ("<pad>", "<eos>")])
    tok.add_tokens([AddedToken(t, normalized=False) for t in ("<think>", "</think>", ".\n\n")])
    Path(path).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(path) / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
    }
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(config))
    assert len(vocab) <= VOCAB
    return vocab


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, valid):
    out = nnx.merge(graphdef, state)(tokens, positions, valid)
    return out.logits, out.penultimate


def msjax_forward(model, tokens, positions=None, valid=None):
    """Jitted msjax forward (compiled once per config and shape): (logits, penultimate) as numpy."""
    tokens = np.asarray(tokens, np.int32)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    if valid is None:
        valid = np.ones(tokens.shape, bool)
    graphdef, state = nnx.split(model)
    logits, penult = _forward(graphdef, state, tokens, np.asarray(positions, np.int32), valid)
    return np.asarray(logits), np.asarray(penult)


def write_r1_tokenizer(path: Path) -> dict[str, int]:
    """A word-level tokenizer in the DeepSeek-R1-Distill style: its BOS / EOS / pad special
    tokens, <｜User｜>, <｜Assistant｜>, the think tags, ".\\n\\n" and "\\boxed{1}" as added
    (non-special) tokens, lower-case words and digits, and R1_TEMPLATE as the chat template in
    tokenizer_config.json. Returns the vocabulary."""
    vocab = {t: i for i, t in enumerate(R1_SPECIAL + R1_ADDED + WORDS + ["[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in R1_SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False) for t in R1_ADDED])
    Path(path).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(path) / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": R1_SPECIAL[0],
        "eos_token": R1_SPECIAL[1],
        "pad_token": R1_SPECIAL[2],
        "chat_template": R1_TEMPLATE,
    }
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert len(vocab) <= VOCAB
    return vocab
