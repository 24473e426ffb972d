"""The conversations of a workload (benchmarks/workload.py): what a user says each turn and
how long the model answers; summarize() gives the measured means of a set of them, and
cap_context() cuts a conversation at a context limit.

Only numpy (no jax): a peer process without jax imports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Turn:
    prompt_len: int                 # new user tokens this turn (token-level replay)
    answer_len: int                 # tokens to generate (max_tokens; ignore_eos in token mode)
    text: str | None = None         # the user's message (text mode)
    answer: str | None = None       # the dataset's answer (text mode; informative only)


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Turn, ...]
    system_len: int = 0             # system prompt tokens before the first turn
    system: str | None = None       # its text (text mode)
    system_key: str | None = None   # conversations with the same key share the system prompt

    def context_len(self) -> int:
        return self.system_len + sum(t.prompt_len + t.answer_len for t in self.turns)


def summarize(conversations: Sequence[Conversation]) -> dict[str, Any]:
    turns = [t for c in conversations for t in c.turns]
    if not turns:
        return {"conversations": len(conversations), "turns": 0}
    ctx = [c.context_len() for c in conversations]
    return {
        "conversations": len(conversations), "turns": len(turns),
        "mean_turns": len(turns) / len(conversations),
        "mean_prompt_tokens": float(np.mean([t.prompt_len for t in turns])),
        "mean_answer_tokens": float(np.mean([t.answer_len for t in turns])),
        "mean_system_tokens": float(np.mean([c.system_len for c in conversations])),
        "mean_context_tokens": float(np.mean(ctx)), "max_context_tokens": int(max(ctx)),
        "max_turns": max(len(c.turns) for c in conversations),
    }


def cap_context(turns: list[Turn], system_len: int, max_context: int | None) -> list[Turn]:
    """The turns before the first one whose history (from system_len tokens) would exceed
    max_context (None or 0: all of them)."""
    if not max_context:
        return turns
    total, kept = system_len, []
    for t in turns:
        total += t.prompt_len + t.answer_len
        if total > max_context:
            break
        kept.append(t)
    return kept
