"""How a step's rows are laid out: the Row a scheduled turn contributes, the program a step
runs in (fit_to_program) and the order waiting turns are admitted in (order_waiting)."""

from __future__ import annotations

import collections
import itertools
from typing import TYPE_CHECKING, NamedTuple

from pensieve_jax.kvcache.conversations import ConversationStore

if TYPE_CHECKING:
    from pensieve_jax.engine.request import Request
    from pensieve_jax.engine.scheduler import SchedulerConfig


class Row(NamedTuple):
    request: Request
    start: int       # first token index of this chunk in request.token_ids
    end: int         # one past the last
    sample: bool     # the chunk ends the sequence: sample the next token
    front: bool = False   # recomputes part of a dropped prefix (kv_len = end)



def fit_to_program(rows: list[Row], token_buckets: tuple[int, ...]) -> list[Row]:
    """A step runs in the smallest program that holds its tokens. When it also holds decodes
    (so another step follows anyway) and its last row is a prefill chunk, end that chunk at
    the program below if that pads less than it defers: the rest rides along the next step.
    A prefill alone is never cut (that would only add a step before its first token)."""
    total = sum(r.end - r.start for r in rows)
    below = [t for t in token_buckets if t < total]
    above = [t for t in token_buckets if t >= total]
    if not rows or not below or not above:
        return rows
    last, cut = rows[-1], total - below[-1]
    decodes = any(r.sample and r.end - r.start == 1 for r in rows[:-1])
    if not decodes or last.end - last.start <= cut or above[0] - total <= cut:
        return rows
    if last.end - last.start == 1 and last.sample:
        return rows
    return rows[:-1] + [last._replace(end=last.end - cut, sample=False)]


def order_waiting(waiting: collections.deque[Request], store: ConversationStore,
                  config: SchedulerConfig) -> collections.deque[Request]:
    """Preble's local rule: waiting turns with more of their prompt cached go first, except
    that a turn passed over for fairness_steps steps (and preempted turns) keeps its place
    in arrival order ahead of them. Returns the queue in its new order."""
    if len(waiting) < 2 or store.index is None:
        return waiting
    window = list(itertools.islice(waiting, config.order_window))
    for req in window:
        req.waited += 1

    def key(item):
        i, req = item
        if req.conversation is not None or req.waited > config.fairness_steps:
            return (0, 0.0, i)
        hit = store.cached_prefix(req.requested_conversation, req.prompt, req.salt)
        return (1, -hit / len(req.prompt), i)
    ordered = [r for _, r in sorted(enumerate(window), key=key)]
    rest = list(itertools.islice(waiting, len(window), None))
    return collections.deque(ordered + rest)
