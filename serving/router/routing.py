"""Routing policies of the router: round-robin, conversation affinity, and Preble's E2.

Each policy picks a replica for one request from `Candidate`s (the healthy replicas, with what
the router's prefix tree and load accounting say about them). They are pure functions of their
inputs, so the decisions are unit-tested without servers.

Costs are in token-equivalents (one prefilled token = 1): Preble's cost of sending a request to
instance i is L_i (its load: the compute of what it was sent within the recent window) + M_i
(the eviction cost: recomputing what must leave its cache for the new tokens to fit) + P_i (the
prefill of this request's tokens that i does not have cached).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

POLICIES = ("round-robin", "affinity", "e2")


class Candidate(NamedTuple):
    replica: int
    load: float            # token-equivalents routed to it within the recent window
    matched: int           # longest prefix of the request the tree says it caches
    cached: int            # tokens the tree says it holds
    capacity: int          # tokens its cache holds (estimate; 0: unknown)


class Decision(NamedTuple):
    replica: int
    reason: str            # "round-robin", "affinity", "exploit", "explore", "rebalance"
    matched: int           # the prefix the tree expects the replica to have cached


@dataclasses.dataclass(frozen=True)
class E2Config:
    decode_weight: float = 1.0        # cost of one generated token, in prefilled tokens
    eviction_weight: float = 1.0      # cost of one evicted token (it may be recomputed later)
    rebalance_threshold: float = 2048.0   # move a conversation when home costs this much more
    affinity: bool = True             # a conversation sticks to its replica (unless rebalanced)


def e2_cost(c: Candidate, prompt_len: int, config: E2Config) -> float:
    """Preble's explore cost of sending a prompt of prompt_len tokens to candidate c."""
    missed = prompt_len - c.matched
    eviction = 0.0
    if c.capacity > 0:
        eviction = max(0, c.cached + missed - c.capacity) * config.eviction_weight
    return c.load + eviction + missed


def e2_choose(candidates: Sequence[Candidate], prompt_len: int, config: E2Config = E2Config(),
              home: int | None = None) -> Decision:
    """E2: exploit the replica with the longest cached prefix when the cached part is longer
    than the part to compute; else explore the lowest cost replica. With a `home` replica
    (conversation affinity) stay there. Either way, when the pick costs rebalance_threshold
    more than the cheapest replica, rebalance: take the cheapest (it computes the prefix)."""
    if not candidates:
        raise LookupError("no replica is available")
    by_id = {c.replica: c for c in candidates}
    cheapest = min(candidates, key=lambda c: (e2_cost(c, prompt_len, config), c.replica))
    if config.affinity and home in by_id:
        h = by_id[home]
        gap = e2_cost(h, prompt_len, config) - e2_cost(cheapest, prompt_len, config)
        if cheapest.replica != home and gap > config.rebalance_threshold:
            return Decision(cheapest.replica, "rebalance", cheapest.matched)
        return Decision(home, "affinity", h.matched)
    best = max(candidates, key=lambda c: (c.matched, -c.load, -c.replica))
    if best.matched > prompt_len - best.matched:
        gap = e2_cost(best, prompt_len, config) - e2_cost(cheapest, prompt_len, config)
        if gap > config.rebalance_threshold:     # a hot prefix on an overloaded replica:
            return Decision(cheapest.replica, "rebalance", cheapest.matched)   # copy it
        return Decision(best.replica, "exploit", best.matched)
    return Decision(cheapest.replica, "explore", cheapest.matched)


class RoundRobin:
    """Each request goes to the next healthy replica in turn (conversations do not stick)."""

    def __init__(self):
        self._next = 0

    def choose(self, candidates: Sequence[Candidate]) -> Decision:
        if not candidates:
            raise LookupError("no replica is available")
        ids = sorted(c.replica for c in candidates)
        pick = next((r for r in ids if r >= self._next), ids[0])
        self._next = pick + 1
        match = next(c.matched for c in candidates if c.replica == pick)
        return Decision(pick, "round-robin", match)


def affinity_choose(candidates: Sequence[Candidate], home: int | None,
                    fallback: RoundRobin) -> Decision:
    """Conversation affinity: stay on the home replica while it is healthy; new conversations
    (and those whose replica died) go round-robin."""
    for c in candidates:
        if c.replica == home:
            return Decision(home, "affinity", c.matched)
    return fallback.choose(candidates)


__all__ = ["Candidate", "Decision", "E2Config", "POLICIES", "RoundRobin", "affinity_choose",
           "e2_choose", "e2_cost"]
