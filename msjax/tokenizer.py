"""The tokenizer wrapper and the prompt templates.

`Tokenizer` wraps a Hugging Face fast tokenizer (`tokenizers.Tokenizer`, i.e. a `tokenizer.json`)
and resolves what the rest of msjax needs from it: the EOS ids (all of them), BOS, PAD, the step
delimiter ids (REFERENCE section 2) and the `<think>` / `</think>` ids.

The step delimiter is `encode(".\\n\\n")`, which must be ONE token (it is in the Qwen2 vocabulary
and in the synthetic task's tokenizer). A vocabulary where it is several tokens needs the caller to
pass `step_ids=` explicitly (or `step_mode="chinese"`); msjax refuses to guess.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

STEP_DELIMITER = ".\n\n"
THINK_START = "<think>"
THINK_END = "</think>"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
MATH_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."

# Template pieces around the (problem + suffix) text.
TEMPLATES: dict[str, tuple[str, str]] = {
    # DeepSeek-R1-Distill chat format (what the MetaStone-S1 1.5B/7B recipes start from).
    "r1": (BOS_TOKEN + USER_TOKEN, ASSISTANT_TOKEN + THINK_START + "\n"),
    # No chat tokens: for base models and the synthetic task.
    "plain": ("", "\n" + THINK_START + "\n"),
}

STEP_MODES = ("default", "chinese")
# The CLIs' --lang (the original's flag) -> step_mode.
LANG_STEP_MODES = {"en": "default", "zh": "chinese"}
# The named special tokens transformers passes to a chat template (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def render_prompt(problem: str, template: str = "r1", suffix: str | None = MATH_SUFFIX) -> str:
    """The prompt of a bare `problem` in a text template: `{prefix}{problem} {suffix}{postfix}`.

    "r1" = `<｜begin▁of▁sentence｜><｜User｜>{problem} {suffix}<｜Assistant｜><think>\\n`,
    "plain" = `{problem} {suffix}\\n<think>\\n`. `suffix=None` (or "") leaves the suffix out.
    A shortcut of `msjax.templates.render_prompt` (the one renderer, which also has chat
    templates and prompt kinds).
    """
    from msjax.templates import render_prompt as render

    return render(problem, kind="problem", template=template, suffix=suffix)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove the file") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_chat_template(path: Path, tok_cfg: dict[str, Any]) -> tuple[str | None, str]:
    """(template text or None, the file it came from) of a tokenizer folder, looked up as
    transformers does: chat_template.jinja, then chat_template.json, then the "chat_template"
    of tokenizer_config.json; a list of named templates gives its "default" one."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), str(jinja)
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja} is not UTF-8 text ({e}); fix or remove it") from e
    where = path / "chat_template.json"
    value = _read_json(where).get("chat_template")
    if value is None:
        where, value = path / "tokenizer_config.json", tok_cfg.get("chat_template")
    if value is None:
        return None, ""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(
                f"{where}: chat_template is a list of named templates {sorted(map(str, named))} "
                "without a 'default' one; name one of them 'default'"
            )
        value = named["default"]
    if not isinstance(value, str):
        raise ValueError(f"{where}: chat_template must be text, found {type(value).__name__}")
    return value, str(where)


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"expected a token id or a list of ids, found {value!r}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def chinese_step_ids(backend: tokenizers.Tokenizer) -> tuple[int, ...]:
    """The step delimiters of the Chinese step mode (the 32B `--lang zh` rule, REFERENCE 9):
    every non-special vocab token whose decoded text has at most 3 characters and, for "\\n" or
    for "。", contains it and keeps at most one other character once every occurrence of it is
    removed ("\\n\\n", "。\\n", ")\\n", "x\\n\\n" qualify; "ab\\n", "a\\nb" do not)."""
    n = backend.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    texts = backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)

    def is_step(t: str) -> bool:
        return len(t) <= 3 and any(m in t and len(t.replace(m, "")) <= 1 for m in ("\n", "。"))

    return tuple(i for i, t in enumerate(texts) if i not in special and is_step(t))


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids msjax needs.

    Attributes:
      vocab_size: number of ids, added tokens included.
      eos_ids: every id that ends a response (tokenizer EOS first, then generation_config's).
      bos_id: the BOS id or None. pad_id: the PAD id (the first EOS when there is no pad token).
      step_ids: the step delimiter ids (see module docstring).
      think_start_id / think_end_id: ids of `<think>` / `</think>`, or None.
      chat_template: the Jinja chat template text or None; chat_template_file: where it came from.
      special_tokens: the named special tokens of the config ({"bos_token": str, ...}), the
        variables a chat template sees.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_ids: Sequence[int],
        bos_id: int | None = None,
        pad_id: int | None = None,
        step_ids: Sequence[int] | None = None,
        step_mode: str = "default",
        extra_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        chat_template_file: str = "",
        special_tokens: dict[str, str] | None = None,
    ):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        if not eos_ids:
            raise ValueError("a Tokenizer needs at least one EOS id")
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.bos_id = None if bos_id is None else int(bos_id)
        self.pad_id = self.eos_ids[0] if pad_id is None else int(pad_id)
        for name, ids in (("eos", self.eos_ids), ("bos", [self.bos_id]), ("pad", [self.pad_id])):
            for i in ids:
                if i is not None and not 0 <= i < self.vocab_size:
                    raise ValueError(
                        f"{name} id {i} is outside the vocabulary [0, {self.vocab_size})"
                    )
        if step_mode not in STEP_MODES:
            raise ValueError(f"unknown step_mode {step_mode!r}; known: {STEP_MODES}")
        self.step_mode = step_mode
        if step_ids is not None:
            step_ids = tuple(int(i) for i in step_ids)
            bad = [i for i in step_ids if not 0 <= i < self.vocab_size]
            if not step_ids or bad:
                raise ValueError(f"step_ids {step_ids} must be non-empty ids in the vocabulary")
        elif step_mode == "chinese":
            step_ids = chinese_step_ids(backend)
        else:
            step_ids = tuple(self.encode(STEP_DELIMITER))
            if len(step_ids) != 1:
                raise ValueError(
                    f"the step delimiter {STEP_DELIMITER!r} encodes to {len(step_ids)} tokens "
                    f"{step_ids} in this vocabulary; pass step_ids=[...] explicitly (the ids that "
                    "end a step) or step_mode='chinese'"
                )
        self.step_ids = step_ids
        self.think_start_id = backend.token_to_id(THINK_START)
        self.think_end_id = backend.token_to_id(THINK_END)
        self.extra_config = dict(extra_config or {})
        self.chat_template = chat_template
        self.chat_template_file = chat_template_file or "the tokenizer"
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike,
        *,
        step_ids: Sequence[int] | None = None,
        step_mode: str = "default",
    ) -> Tokenizer:
        """Loads tokenizer.json from `path`; EOS/BOS/PAD come from tokenizer_config.json (and
        special_tokens_map.json), generation_config.json and config.json when present."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(
                f"{tj} not found: msjax needs a Hugging Face fast tokenizer file. Write one with "
                "transformers: AutoTokenizer.from_pretrained(src).save_pretrained(dir)"
            )
        backend = tokenizers.Tokenizer.from_file(str(tj))
        tok_cfg = {**_read_json(path / "special_tokens_map.json")}
        tok_cfg.update(_read_json(path / "tokenizer_config.json"))
        gen_cfg = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")

        def token_id(key: str) -> int | None:
            content = _token_content(tok_cfg.get(key))
            if content is None:
                return None
            i = backend.token_to_id(content)
            if i is None:
                raise ValueError(
                    f"{path / 'tokenizer_config.json'}: {key} {content!r} is not a token of "
                    f"{tj}; fix the config or the vocabulary"
                )
            return i

        def config_ids(key: str) -> list[int]:
            out = []
            for cfg, name in ((gen_cfg, "generation_config.json"), (model_cfg, "config.json")):
                try:
                    out += _id_list(cfg.get(key))
                except ValueError as e:
                    raise ValueError(f"{path / name}: {key}: {e}") from e
            return out

        eos = [i for i in [token_id("eos_token")] if i is not None] + config_ids("eos_token_id")
        if not eos:
            raise ValueError(
                f"no EOS token found in {path}: set eos_token in tokenizer_config.json or "
                "eos_token_id in generation_config.json"
            )
        bos = token_id("bos_token")
        if bos is None:
            bos = next(iter(config_ids("bos_token_id")), None)
        pad = token_id("pad_token")
        if pad is None:
            pad = next(iter(config_ids("pad_token_id")), None)
        extra = {k: tok_cfg[k] for k in ("model_max_length",) if k in tok_cfg}
        chat_template, chat_file = read_chat_template(path, tok_cfg)
        named = {k: t for k in NAMED_TOKENS if (t := _token_content(tok_cfg.get(k))) is not None}
        return cls(
            backend,
            eos_ids=eos,
            bos_id=bos,
            pad_id=pad,
            step_ids=step_ids,
            step_mode=step_mode,
            extra_config=extra,
            chat_template=chat_template,
            chat_template_file=chat_file,
            special_tokens=named,
        )

    @property
    def eos_id(self) -> int:
        """The first (main) EOS id."""
        return self.eos_ids[0]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary token (its raw form), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """The raw vocabulary form of id `i`."""
        return self.backend.id_to_token(int(i))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> token ids (special-token strings inside the text are recognised)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        """Several texts -> lists of token ids."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Token ids -> text."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def special_tokens_map(self) -> dict[str, str]:
        """bos/eos/pad token strings, as transformers' special_tokens_map.json writes them."""
        out = {}
        for key, i in (
            ("bos_token", self.bos_id),
            ("eos_token", self.eos_id),
            ("pad_token", self.pad_id),
        ):
            if i is not None:
                out[key] = self.backend.id_to_token(i)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`.

        `transformers.AutoTokenizer.from_pretrained(path)` loads the folder offline and gives the
        same ids (tokenizer_class PreTrainedTokenizerFast reads tokenizer.json as it is). Only the
        first EOS id is expressible there; generation_config.json (written with the model) carries
        the full list.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "tokenizer.json", self.backend.to_str(pretty=True))
        special = self.special_tokens_map()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            **self.extra_config,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(path / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(path / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
