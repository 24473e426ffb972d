"""Which replica serves a request: the routing policy (serving/router/routing.py) applied to
the healthy replicas, as the cache view's prefix tree and the replicas' load see them."""

from __future__ import annotations

import time
from typing import Sequence

from serving.router.cache_view import CacheView
from serving.router.errors import NoReplica
from serving.router.replicas import ROLES, ReplicaSet
from serving.router.routing import POLICIES, Candidate, Decision, E2Config, RoundRobin, \
    affinity_choose, e2_choose
from serving.router.stats import RouterStats


class ReplicaChooser:
    """Routes a request's token ids to a replica under one policy (round-robin, affinity, e2).
    e2 holds the E2 costs (for affinity and round-robin only its decode weight counts)."""

    def __init__(self, replicas: ReplicaSet, cache: CacheView, stats: RouterStats,
                 policy: str = "e2", e2: E2Config = E2Config()):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.replicas = replicas
        self.cache = cache
        self.stats = stats
        self.policy = policy
        self.e2 = e2 if policy == "e2" else E2Config(affinity=policy == "affinity")
        self.rr = RoundRobin()

    def candidates(self, ids: list[int], roles: Sequence[str] = ROLES,
                   salt: str = "") -> list[Candidate]:
        """The healthy replicas of `roles`, with their load and what the tree says they hold
        of `ids` under cache salt `salt`."""
        tree = self.cache.tree
        match = tree.match(ids, salt)
        now = time.monotonic()
        return [Candidate(r.index, r.load(now), match.get(r.index, 0),
                          tree.cached_tokens(r.index), r.capacity)
                for r in self.replicas.healthy(roles)]

    def route(self, ids: list[int], home: int | None, roles: Sequence[str] = ROLES,
              salt: str = "") -> Decision:
        """The replica for a request of `ids` under cache salt `salt` (home: the
        conversation's replica, if any), among healthy replicas of the given roles."""
        candidates = self.candidates(ids, roles, salt)
        if not candidates:
            raise NoReplica("no replica is available (all failed their health checks)")
        if self.policy == "round-robin":
            decision = self.rr.choose(candidates)
        elif self.policy == "affinity":
            decision = affinity_choose(candidates, home, self.rr)
        else:
            decision = e2_choose(candidates, len(ids), self.e2, home)
        self.stats.reason(decision.reason)
        return decision

    def turn_done(self, usage, predicted: int) -> None:
        """A routed turn (or Generate) finished: count it under the policy."""
        self.stats.turn(self.policy, usage, predicted)


__all__ = ["ReplicaChooser"]
