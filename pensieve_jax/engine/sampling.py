"""Sampling parameters: how a request picks its tokens (the sampler that applies them runs
inside the step program: pensieve_jax/runner/sampler.py).

SamplingParams checks what needs no model (types, ranges, finite values, bounded stop lists);
the engine's submit checks the rest against the model (request.check_sampling: max_tokens
against max_model_len, top_k and stop_token_ids against the vocabulary)."""

from __future__ import annotations

import dataclasses
import math
import numbers

from pensieve_jax.engine.errors import brief

INT32_MAX = 2**31 - 1          # the step's int32 arrays: no count or id may exceed it
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024          # per stop string
MAX_STOP_TOKEN_IDS = 1024


def _integer(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {brief(value)}")


def _real(name: str, value, ok, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a finite number {what}, got {brief(value)}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 mean no truncation.

    The same seed (with the same prompt and model) gives the same output; seed None draws one.
    stop strings end generation once the decoded output contains one of them; generation also
    ends at the tokenizer's end-of-turn ids unless ignore_eos, and at any stop_token_ids.
    Invalid values raise ValueError naming the field.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _integer("max_tokens", self.max_tokens, 1, INT32_MAX)
        object.__setattr__(self, "temperature", _real(
            "temperature", self.temperature, lambda t: 0 <= t <= MAX_TEMPERATURE,
            f"in [0, {MAX_TEMPERATURE:g}]"))
        object.__setattr__(self, "top_p", _real("top_p", self.top_p, lambda p: 0 < p <= 1,
                                                "in (0, 1]"))
        _integer("top_k", self.top_k, 0, INT32_MAX)
        if self.seed is not None:
            _integer("seed", self.seed, 0, 2**32 - 1)
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"stop must be non-empty strings of at most {MAX_STOP_CHARS} "
                                 f"characters, got {brief(s)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got "
                             f"{len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _integer("stop_token_ids", t, 0, INT32_MAX)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))
