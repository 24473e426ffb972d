"""What the router learns about its replicas and reports about itself: health checks, cache
reports, GetStats. Mixed into RouterService (serving/router.py), whose replicas and prefix tree
it keeps up to date.

Health: every health_period_s the router asks each replica's gRPC health service. One that
fails, or answers NOT_SERVING (a replica still warming up, or shutting down), is marked down
(RouterService.mark_down) and gets no calls; one that answers SERVING again is marked up. The
first round runs before the router takes calls. While a replica is healthy its GetStats gives
its cache capacity (the tree's LRU capacity estimate) and, unless the router was given its
role, its role.

Cache reports: every cache_report_interval_s the router polls each replica's
MemPool.CacheReport (pensieve_jax/kvcache/report.py): per conversation there, the token ids whose
KV it still holds, versioned so that only changes travel. The tree keeps one keyed holder per
replica conversation (`PrefixTree.hold`) and each report resets it: prefixes a replica let go
(evicted, ended, expired) stop counting for it, prefixes it holds that the router did not route
(KV imports, clients that bypass the router) start counting. Between reports, the turns the
router routes are credited at once (a holder keyed by the replica's conversation id, which the
next report confirms or corrects). Replicas that do not implement CacheReport (older servers;
logged once) keep the estimate: what was routed there, aged out by LRU against capacity. Without
a tokenizer the tree is keyed on bytes, not token ids, and reports are not used.

GetStats: the router sums its healthy replicas' stats; stats_json holds `router_stats()` (events,
routing reasons, KV moves, disaggregation, the conversation table, the tree, cache reports, each
replica) and each replica's own stats_json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.router_state import ROLES, SERVICE_NAME, Replica

log = logging.getLogger("serving.router")      # the router's one logger, whichever module logs


class ReportsMixin:
    # -- health ---------------------------------------------------------------------------------

    async def check(self, r: Replica) -> None:
        """One health check of r; while healthy, refresh its cache capacity estimate."""
        if r.leaving:
            return
        try:
            reply = await r.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                         timeout=2)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as e:
            ok, reply = False, e.code().name
        if not ok:
            self.mark_down(r, f"health check: {reply if isinstance(reply, str) else 'NOT_SERVING'}")
            return
        if not r.healthy:
            log.info("replica %s (%s) is up", r.index, r.target)
            if r.reports is False:
                r.reports = None          # ask again: it may have been upgraded
        r.healthy = True
        s = await self._replica_stats(r)
        if s is not None:
            pages = json.loads(s.stats_json)
            size = pages.get("page_size", 0)
            r.capacity = size * (pages["pages"]["device"]["total"] + pages["pages"]["host"]["total"])
            if not r.role_fixed and pages.get("role") in ROLES:
                r.role = pages["role"]
            if not r.reports:
                self.events["tree_evicted_tokens"] += self.tree.evict(r.index, r.capacity)

    async def health_loop(self, period_s: float) -> None:
        while True:
            await asyncio.gather(*(self.check(r) for r in self.replicas), return_exceptions=True)
            await asyncio.sleep(period_s)

    # -- cache reports --------------------------------------------------------------------------

    async def poll_cache(self, r: Replica) -> None:
        """Ask r what its cache holds (what changed since its last report) and reconcile."""
        if not r.healthy or r.leaving or r.reports is False or not self.keys.exact:
            return
        failures, sent_at = r.failures, time.monotonic()
        request = pb.CacheReportRequest(epoch=r.report_epoch, since_version=r.report_version)
        try:
            reply = await r.mempool.CacheReport(
                request, timeout=max(5.0, 2 * self.cache_report_interval_s))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                self.reports["failed"] += 1      # down or busy: the health loop decides
                return
            log.warning("replica %s (%s) does not report its cache (MemPool.CacheReport: %s): "
                        "the router estimates it from the turns it routes there",
                        r.index, r.target, e.code().name)
            if r.reports:                        # replaced by an older server: estimate anew
                self.tree.drop_replica(r.index)
                r.reported.clear()
                r.learnt.clear()
            r.reports = False
            return
        if r.healthy and r.failures == failures and r.report_epoch == request.epoch and \
                r.report_version == request.since_version:   # else stale: it went down since
            self.apply_report(r, reply, sent_at)

    def apply_report(self, r: Replica, reply: pb.CacheReportResponse, sent_at: float) -> None:
        """Reconcile the tree with a report of r, asked for at sent_at (router clock).

        Each conversation the report names now holds exactly the tokens it lists (none: removed
        or, in a full report, not listed). Except those the router credited by routing after
        sent_at: the report may predate their turn, so the next one decides. Those credited
        before sent_at and absent from the replica's conversations are let go (routed there but
        not kept: evicted already, or a replica that keeps nothing)."""
        now, stats = time.monotonic(), self.reports
        stats["received"] += 1
        first = not r.reports
        r.reports = True
        pending = {key for key, t in r.learnt.items() if t >= sent_at}
        if reply.full:
            stats["full"] += 1
            listed = {c.conversation_id for c in reply.conversations}
            for key in self.tree.holders(r.index):
                if key not in listed and key not in pending:
                    self._reconcile(r, key, (), now)
            r.reported.clear()
        for c in reply.conversations:
            r.reported.add(c.conversation_id)
            if c.conversation_id not in pending:
                self._reconcile(r, c.conversation_id, c.token_ids, now, c.cache_salt)
        for key in reply.removed:
            r.reported.discard(key)
            if key not in pending:
                self._reconcile(r, key, (), now)
        for key, t in list(r.learnt.items()):
            if t < sent_at:
                del r.learnt[key]
                if key not in r.reported:
                    self._reconcile(r, key, (), now)
        if reply.full:                # what routing credited before reports: the estimate
            dropped = self.tree.drop_unheld(r.index)
            stats["estimate_dropped_tokens" if first else "evicted_tokens_learnt"] += dropped
        stats["changed"] += bool(reply.full or reply.conversations or reply.removed)
        r.report_epoch, r.report_version = reply.epoch, reply.version
        if len(r.reported) != reply.num_conversations:      # out of step: start over
            stats["resyncs"] += 1
            r.report_epoch, r.report_version = "", 0

    def _reconcile(self, r: Replica, key: str, tokens, now: float, salt: str = "") -> None:
        change = self.tree.hold(tokens, r.index, key, now, salt)
        if change < 0:
            self.reports["evictions_learnt"] += 1
            self.reports["evicted_tokens_learnt"] -= change
        elif change > 0:
            self.reports["inserts_learnt"] += 1
            self.reports["inserted_tokens_learnt"] += change

    async def report_loop(self, period_s: float) -> None:
        while True:
            results = await asyncio.gather(*(self.poll_cache(r) for r in self.replicas),
                                           return_exceptions=True)
            for r, result in zip(self.replicas, results):
                if isinstance(result, Exception):
                    log.error("cache report of replica %s failed", r.target, exc_info=result)
            await asyncio.sleep(period_s)

    # -- GetStats -------------------------------------------------------------------------------

    async def _replica_stats(self, r: Replica):
        if not r.healthy:
            return None
        try:
            return await r.stub.GetStats(pb.GetStatsRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return None

    def router_stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "policy": self.policy, "events": dict(self.events), "reasons": dict(self.reasons),
            "kv_move": self.kv_move, "kv_moves": self.moves.as_dict(),
            "cost_model": self.cost.as_dict(),
            "disaggregation": {"active": self.disaggregated(),
                               "prefills": self.disagg["prefills"],
                               "to_decode": self.disagg["to_decode"].as_dict(),
                               "to_prefill": self.disagg["to_prefill"].as_dict()},
            "by_policy": {p: c.as_dict() for p, c in self.counters.items()},
            "conversations": len(self.conversations),
            "conversation_table": {
                "held": len(self.conversations), "in_flight": self.conversations.busy(),
                "ttl_s": self.conversations.ttl_s,
                "max_conversations": self.conversations.max_entries or 0,
                **self.forgotten["conversations"],
                "generations": {"held": len(self.generated), **self.forgotten["generations"]}},
            "tree": {"nodes": self.tree.num_nodes(),
                     "salts": len(self.tree.salts()) - 1,     # salted trees held
                     "eviction": "replicas reporting their cache (cache_report 'reporting'): "
                                 "as their reports say; others: LRU against each replica's "
                                 "cache capacity (estimated)"},
            "cache_reports": {"interval_s": self.cache_report_interval_s
                              if self.keys.exact else 0.0, **self.reports},
            "replicas": [{"target": r.target, "healthy": r.healthy, "routed": r.routed,
                          "role": r.role, "leaving": r.leaving,
                          "in_flight": r.in_flight, "load": r.load(now),
                          "failures": r.failures, "capacity_tokens": r.capacity,
                          "tree_tokens": self.tree.cached_tokens(r.index),
                          "cache_report": self._report_mode(r),
                          "reported_conversations": len(r.reported)}
                         for r in self.replicas]}

    def _report_mode(self, r: Replica) -> str:
        if not self.keys.exact or self.cache_report_interval_s <= 0:
            return "off"
        return {None: "pending", True: "reporting", False: "unsupported"}[r.reports]

    async def _stats(self) -> pb.GetStatsResponse:
        stats = await asyncio.gather(*(self._replica_stats(r) for r in self.replicas))
        live = [s for s in stats if s is not None]
        out = pb.GetStatsResponse(model=live[0].model if live else "",
                                  active_streams=self.active_streams,
                                  server_conversations=len(self.conversations))
        for s in live:
            for f in ("running", "waiting", "conversations", "pages_used", "pages_total",
                      "hit_tokens", "miss_tokens"):
                setattr(out, f, getattr(out, f) + getattr(s, f))
        out.stats_json = json.dumps({
            "router": self.router_stats(),
            "replicas": [json.loads(s.stats_json) if s is not None else None for s in stats]},
            sort_keys=True)
        return out


__all__ = ["ReportsMixin"]
