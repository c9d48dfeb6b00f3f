"""Prompt rendering, the one renderer of msjax-infer, msjax-train's data pipeline and eval.py.

A prompt comes in one of three kinds (REFERENCE section 9):
  "problem": a bare problem; the math suffix is appended (`{problem} {suffix}`).
  "prompt":  text that already carries its instructions (the AIME JSONL `prompt`), used as is.
  "chat":    a list of chat messages `{"role", "content"}` (the verl parquet `prompt`).
The problem or prompt text is the user message. Templates:
  "chat":  the checkpoint's own Jinja chat template with the generation prompt added, rendered
           exactly as transformers' `apply_chat_template(..., tokenize=False,
           add_generation_prompt=True)` renders it (same Jinja settings, filters and variables).
  "none":  the text verbatim.
  "r1", "plain": msjax's fixed templates (`msjax.tokenizer.TEMPLATES`).
A conversation renders with "none" / "r1" / "plain" only when it is one user message (its text).
Default (template None): "chat" when the tokenizer has a chat template, else "none" for a
"prompt" and "r1" for the other kinds.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from msjax.tokenizer import MATH_SUFFIX, TEMPLATES

TEMPLATE_NAMES = ("chat", "none", "r1", "plain")
KINDS = ("problem", "prompt", "chat")
ROLES = ("system", "user", "assistant", "tool")
Messages = tuple[dict[str, str], ...]


def check_messages(messages: Any) -> Messages:
    """A chat conversation as a tuple of {"role", "content"} dicts; ValueError naming the message
    for anything else (not a list, an unknown role, content that is not text)."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        kind = type(messages).__name__
        raise ValueError(f"a chat prompt must be a list of messages, found {kind}")
    if not messages:
        raise ValueError("the chat prompt has no message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"chat message {i} must be an object with a 'role', found {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(
                f"chat message {i} has the unknown role {m['role']!r}; roles are {ROLES}"
            )
        if not isinstance(m.get("content"), str):
            raise ValueError(f"chat message {i} ({m['role']}) needs a text 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: plain json.dumps (Jinja's own escapes HTML characters).
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """transformers' `{% generation %}...{% endgeneration %}` block (it marks assistant text
        for training masks); rendering emits the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """A checkpoint's Jinja chat template and the special-token strings it may use.

    source: the template text; where: the file it came from (named in errors);
    special_tokens: {"bos_token": "<...>", "eos_token": ...} as the tokenizer config declares them.
    """

    def __init__(self, source: str, where: str, special_tokens: Mapping[str, str] | None = None):
        self.source, self.where = source, where
        self.special_tokens = dict(special_tokens or {})
        import jinja2

        try:
            self._template = _compile(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template of {where} does not compile: {e}") from e

    @classmethod
    def of(cls, tokenizer) -> ChatTemplate | None:
        """The chat template of an msjax Tokenizer, or None when it has none."""
        if getattr(tokenizer, "chat_template", None) is None:
            return None
        return cls(tokenizer.chat_template, tokenizer.chat_template_file, tokenizer.special_tokens)

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The conversation followed by the assistant's generation prompt; ValueError naming the
        template file when the template raises or fails."""
        messages = check_messages(messages)
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self.special_tokens,
            )
        except Exception as e:  # noqa: BLE001 - a template can raise anything (TypeError, ...)
            raise ValueError(
                f"the chat template of {self.where} failed to render "
                f"({type(e).__name__}: {e}); fix the template or choose --template none|r1|plain"
            ) from e


def default_template(kind: str, chat: ChatTemplate | None) -> str:
    """The template used when none is asked for (see the module docstring)."""
    if chat is not None:
        return "chat"
    return "none" if kind == "prompt" else "r1"


def render_prompt(
    prompt: str | Sequence[Mapping[str, str]],
    *,
    kind: str = "problem",
    template: str | None = None,
    chat: ChatTemplate | None = None,
    suffix: str | None = MATH_SUFFIX,
) -> str:
    """The model's prompt text (see the module docstring).

    prompt: the problem / prompt text, or the chat messages when kind == "chat".
    template: "chat" | "none" | "r1" | "plain" | None (default rule); chat: the tokenizer's
    ChatTemplate (needed by "chat"); suffix: appended to a "problem" ("" / None: nothing).
    Raises ValueError naming the problem: unknown kind or template, "chat" without a template,
    a bad or multi-message conversation for a text template, a template that fails to render.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; kinds are {KINDS}")
    template = default_template(kind, chat) if template is None else template
    if template not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATE_NAMES}")
    if kind == "chat":
        messages = check_messages(prompt)
    else:
        if not isinstance(prompt, str):
            raise ValueError(f"a {kind} must be text, found {type(prompt).__name__}")
        text = prompt.strip() if kind == "problem" else prompt
        if kind == "problem" and suffix:
            text = f"{text} {suffix}"
        messages = ({"role": "user", "content": text},)
    if template == "chat":
        if chat is None:
            raise ValueError(
                "template 'chat' needs the checkpoint's chat template, and its tokenizer files "
                "have none (no chat_template in tokenizer_config.json, no chat_template.jinja); "
                "choose --template none|r1|plain"
            )
        return chat.render(messages)
    if len(messages) != 1 or messages[0]["role"] != "user":
        roles = [m["role"] for m in messages]
        raise ValueError(
            f"a conversation of {len(messages)} messages (roles {roles}) renders only with "
            f"--template chat, not {template!r}"
        )
    text = messages[0]["content"]
    if template == "none":
        return text
    prefix, postfix = TEMPLATES[template]
    return prefix + text + postfix
