"""Where Pensieve's and llama.cpp's greedy tokens first differ, the context both had seen
there, and how close a call llama.cpp's logits make it (a near-tie that f32 summation order
decides, or not)."""

from __future__ import annotations

from typing import Any

import numpy as np

from peers import LLAMA, PENSIEVE


def first_divergence(a: list[list[int]], b: list[list[int]]) -> dict | None:
    """Where two systems' token lists (one per turn) first differ; None if identical."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            i = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return {"turn_index": k, "token_index": i,
                    PENSIEVE: x[i] if i < len(x) else None, LLAMA: y[i] if i < len(y) else None,
                    "tokens_in_turn": [len(x), len(y)]}
    if len(a) != len(b):
        return {"turn_index": min(len(a), len(b)), "token_index": 0, "turns": [len(a), len(b)]}
    return None


def divergence_prefix(prompts: list, tokens: list[list[int]], turn: int, index: int
                      ) -> list[int]:
    """The token sequence both systems had seen when they first chose differently: the
    conversation's earlier turns (user ids + reply) and this turn's ids + the reply so far."""
    conv = prompts[turn][0]
    seq: list[int] = []
    for j in range(turn):
        if prompts[j][0] == conv:
            seq += list(prompts[j][1]) + list(tokens[j])
    return seq + list(prompts[turn][1]) + list(tokens[turn][:index])


def near_tie(llm, seq: list[int], ours: int | None, theirs: int | None) -> dict[str, Any]:
    """llama.cpp's logits at a divergence, recomputed over the whole prefix in one pass (the
    run itself reached it turn by turn, in other batches, so its own sums differ a little):
    both candidates' logits, their gap and the top 3. A gap of a few 1e-3 is a near-tie that
    f32 summation order decides."""
    if ours is None or theirs is None:
        return {}
    logits = llm.logits(seq)
    top = np.argsort(logits)[::-1][:3]
    return {"context_tokens": len(seq),
            "llama_cpp_logit_of": {PENSIEVE: float(logits[ours]), LLAMA: float(logits[theirs])},
            "logit_gap": float(logits[theirs] - logits[ours]),
            "llama_cpp_top3": [[int(t), float(logits[t])] for t in top]}
