"""The router's counters, in one place the parts report to (`RouterStats`): events (failovers,
replays, rebalances, moves, ...), routing reasons, turns and cache hits by policy, KV moves,
disaggregation, forgotten conversations and cache reports. GetStats returns them (under
stats_json's "router", with each part's own state)."""

from __future__ import annotations

import dataclasses
from typing import Any

EVENTS = ("failovers", "replays", "rebalances", "moves", "replica_not_found",
          "tree_evicted_tokens")
FORGOTTEN = ("ended", "expired", "evicted")
REPORTS = ("received", "changed", "full", "failed", "resyncs",
           "evictions_learnt", "evicted_tokens_learnt",       # the tree stopped crediting these
           "inserts_learnt", "inserted_tokens_learnt",        # ... started crediting these
           "estimate_dropped_tokens")     # routed estimates a first report did not confirm


@dataclasses.dataclass
class MoveCounters:
    """KV moved between replicas (MemPool transfers) or left to be recomputed."""
    transfers: int = 0
    recomputes: int = 0               # the cost model chose recomputation
    failed: int = 0                   # a transfer failed: recomputed instead
    tokens: int = 0                   # tokens whose pages were sent
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Counters:
    """Router statistics for one routing policy."""
    turns: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0            # as the replicas report (usage.cached_tokens)
    predicted_tokens: int = 0         # as the prefix tree predicted
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hit_rate"] = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return d


class RouterStats:
    """Every counter of the router. The parts share one and add to it; `events`, `reasons`
    and `counters` may be replaced whole (a benchmark resets them between workloads)."""

    def __init__(self):
        self.events = dict.fromkeys(EVENTS, 0)
        self.reasons: dict[str, int] = {}            # routing decisions by reason
        self.counters: dict[str, Counters] = {}      # policy -> its turns
        self.moves = MoveCounters()                  # conversations moved between replicas
        self.prefills = 0                            # disaggregated: prompts run on prefill
        self.to_decode = MoveCounters()              # ... their KV pushed to decode
        self.to_prefill = MoveCounters()             # ... a conversation's KV back to prefill
        self.forgotten = {"conversations": dict.fromkeys(FORGOTTEN, 0),
                          "generations": dict.fromkeys(FORGOTTEN, 0)}
        self.reports = dict.fromkeys(REPORTS, 0)     # cache reports and what they taught

    def event(self, name: str, n: int = 1) -> None:
        self.events[name] += n

    def reason(self, reason: str) -> None:
        """A routing decision was made for `reason` ("rebalance" also counts as an event)."""
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if reason == "rebalance":
            self.events["rebalances"] += 1

    def turn(self, policy: str, usage, predicted: int) -> None:
        """A finished turn (or Generate) routed by `policy`: its pb.Usage, and the cached
        prefix the tree predicted for it."""
        c = self.counters.setdefault(policy, Counters())
        c.turns += 1
        c.prompt_tokens += usage.prompt_tokens
        c.cached_tokens += usage.cached_tokens
        c.predicted_tokens += predicted
        c.completion_tokens += usage.completion_tokens

    def report_stats(self) -> dict[str, Any]:
        """A Reporter (pensieve_jax/model/reporting.py): the counters no one part owns, as
        router_stats() gives them: events, reasons, kv_moves, by_policy. The others are
        reported by the part that counts them (forgotten: the conversation directory;
        reports: the cache view; prefills, to_decode, to_prefill: the disaggregator)."""
        return {"events": dict(self.events), "reasons": dict(self.reasons),
                "kv_moves": self.moves.as_dict(),
                "by_policy": {p: c.as_dict() for p, c in self.counters.items()}}


__all__ = ["Counters", "MoveCounters", "RouterStats"]
