"""`SamplerConfig`: everything that fixes the compiled decode program (shapes, sampling, stops)."""

from __future__ import annotations

import dataclasses
from typing import Any

from msjax.generate.pruning import PruneRule

# Finish reasons, as stored in `SampleResult.finish` (int32 codes).
RUNNING, EOS, STOP, LENGTH, PRUNED = 0, 1, 2, 3, 4
FINISH_REASONS = ("running", "eos", "stop", "length", "pruned")

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def _ids(name: str, value: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"SamplerConfig.{name}={value!r} must be a sequence of token ids.") from e
    if any(v < 0 for v in out):
        raise ValueError(f"SamplerConfig.{name}={out} holds a negative token id.")
    return out


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Decoding settings; a `Sampler` compiles one program per (batch, prompt bucket) shape.

    max_new_tokens: fixed number of decode slots (responses are padded to it).
    temperature: 0 = greedy (argmax); > 0 = sample from softmax(logits / temperature).
    top_p: nucleus sampling mass in (0, 1]; top_k: keep the k most likely tokens (0 = off).
      Order: temperature, then top-k, then top-p (as transformers' logits warpers).
    repetition_penalty: vLLM's rule, applied before the above: the logit of a token already in
      the prompt or the output is divided by it when positive, multiplied when negative (> 0;
      1 = off). Log-probs stay those of the unpenalised logits.
    eos_ids: tokens that end a response (kept in the response, finish reason "eos").
    stop_sequences: token-id tuples; a response ends (finish reason "stop") once its GENERATED
      tokens end with one of them (the stop tokens are kept in the response).
    pad_id: written after a response's end (and used to left-pad prompts).
    step_ids / think_start_id / think_end_id: the SPRM step rules (REFERENCE section 2).
    prompt_buckets: allowed padded prompt lengths (ascending); the smallest that fits is used.
    score_steps: stream SPRM step scores while decoding (False: scores are all 0).
    prune: optional `PruneRule` (SPRM-guided early pruning within each prompt's n samples).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    eos_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_id: int = 0
    step_ids: tuple[int, ...] = ()
    think_start_id: int | None = None
    think_end_id: int | None = None
    prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    score_steps: bool = True
    prune: PruneRule | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("eos_ids", _ids("eos_ids", self.eos_ids))
        set_("step_ids", _ids("step_ids", self.step_ids))
        set_("prompt_buckets", tuple(sorted(_ids("prompt_buckets", self.prompt_buckets))))
        try:
            stops = tuple(tuple(int(t) for t in s) for s in self.stop_sequences)
        except (TypeError, ValueError) as e:
            raise ValueError(
                "SamplerConfig.stop_sequences must be a sequence of token-id sequences, e.g. "
                "((13, 13),); encode stop strings with the tokenizer first."
            ) from e
        if any(not s or min(s) < 0 for s in stops):
            raise ValueError(
                f"SamplerConfig.stop_sequences={stops} holds an empty sequence or a negative id."
            )
        set_("stop_sequences", stops)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplerConfig.max_new_tokens={self.max_new_tokens!r} must be >= 1.")
        if not self.temperature >= 0:
            raise ValueError(
                f"SamplerConfig.temperature={self.temperature} must be >= 0 (0 = greedy)."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplerConfig.top_p={self.top_p} must be in (0, 1].")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplerConfig.top_k={self.top_k!r} must be an int >= 0 (0 = off).")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"SamplerConfig.repetition_penalty={self.repetition_penalty} must be > 0 "
                "(1 = off; the original's evaluation uses 1.05)."
            )
        if self.pad_id < 0:
            raise ValueError(f"SamplerConfig.pad_id={self.pad_id} must be a token id >= 0.")
        if not self.prompt_buckets or self.prompt_buckets[0] < 1:
            raise ValueError(
                f"SamplerConfig.prompt_buckets={self.prompt_buckets} must be positive lengths."
            )
        if self.score_steps and not self.step_ids:
            raise ValueError(
                "SamplerConfig.score_steps=True needs step_ids (the '.\\n\\n' token id); take "
                "them from the tokenizer (SamplerConfig.from_tokenizer) or set score_steps=False."
            )
        if self.prune is not None and not self.score_steps:
            raise ValueError("SamplerConfig.prune needs score_steps=True (it prunes by score).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def step_capacity(self) -> int:
        """Most steps a response can hold: a counted delimiter never follows a delimiter."""
        return (self.max_new_tokens + 1) // 2

    def replace(self, **changes: Any) -> SamplerConfig:
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_tokenizer(cls, tokenizer, **kwargs: Any) -> SamplerConfig:
        """Takes eos_ids, pad_id, step_ids and the think ids from an `msjax.tokenizer.Tokenizer`
        (any of them can be overridden in `kwargs`)."""
        base = dict(
            eos_ids=tuple(tokenizer.eos_ids),
            pad_id=tokenizer.pad_id,
            step_ids=tuple(tokenizer.step_ids),
            think_start_id=tokenizer.think_start_id,
            think_end_id=tokenizer.think_end_id,
        )
        base.update(kwargs)
        return cls(**base)
