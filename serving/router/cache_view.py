"""The router's view of the replicas' caches: the prefix tree (serving/router/prefix_tree.py),
kept up to date by what the router routes and by the replicas' cache reports.

Cache reports: every cache_report_interval_s the router polls each replica's
MemPool.CacheReport (pensieve_jax/kvcache/report.py): per conversation there, the token ids whose
KV it still holds, versioned so that only changes travel. The tree keeps one keyed holder per
replica conversation (`PrefixTree.hold`) and each report resets it: prefixes a replica let go
(evicted, ended, expired) stop counting for it, prefixes it holds that the router did not route
(KV imports, clients that bypass the router) start counting. Between reports, the turns the
router routes are credited at once (`learn`: a holder keyed by the replica's conversation id,
which the next report confirms or corrects). Replicas that do not implement CacheReport (older
servers; logged once) keep the estimate: what was routed there, aged out by LRU against
capacity. Without a tokenizer (exact=False) the tree is keyed on bytes, not token ids, and
reports are not used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.router.prefix_tree import PrefixTree
from serving.router.replicas import Replica, ReplicaSet
from serving.router.stats import RouterStats

log = logging.getLogger(__name__)


class CacheView:
    """The prefix tree and the replicas' cache reports. A `ReplicaWatcher` of the replica set:
    a replica marked down loses what the tree credits it with."""

    def __init__(self, replicas: ReplicaSet, stats: RouterStats, exact: bool,
                 interval_s: float = 1.0):
        self.replicas = replicas
        self.stats = stats
        self.exact = exact                       # the tree holds token ids (a tokenizer)
        self.interval_s = interval_s             # between cache report polls (0: never)
        self.tree = PrefixTree()
        replicas.watch(self)

    # -- what routing learns ----------------------------------------------------------------------

    def learn(self, replica: Replica, ids: list[int], key: str | None, salt: str = "") -> None:
        """Credit replica with ids under cache salt `salt` (a turn it ran, KV pushed to it). A
        replica that reports its cache gets a holder keyed by its conversation id (its next
        report confirms or corrects it); others the LRU estimate."""
        now = time.monotonic()
        if replica.reports and self.exact:
            if key:
                self.tree.hold(ids, replica.index, key, now, salt)
                replica.learnt[key] = now
            return
        self.tree.insert(ids, replica.index, now, salt)
        if replica.capacity:
            self.stats.event("tree_evicted_tokens", self.tree.evict(replica.index,
                                                                    replica.capacity))

    def let_go(self, index: int, replica_cid: str) -> None:
        """Conversation replica_cid is gone from replica `index` (ended there)."""
        self.tree.hold((), index, replica_cid, time.monotonic())
        self.replicas[index].learnt.pop(replica_cid, None)

    # -- ReplicaWatcher -------------------------------------------------------------------------

    def replica_down(self, replica: Replica) -> None:
        self.tree.drop_replica(replica.index)
        replica.report_epoch, replica.report_version = "", 0    # a full report when it is back
        replica.reported.clear()
        replica.learnt.clear()

    def replica_up(self, replica: Replica) -> None:
        if replica.reports is False:
            replica.reports = None          # ask again: it may have been upgraded

    def replica_measured(self, replica: Replica) -> None:
        if not replica.reports:
            self.stats.event("tree_evicted_tokens",
                             self.tree.evict(replica.index, replica.capacity))

    # -- cache reports --------------------------------------------------------------------------

    async def poll(self, r: Replica) -> None:
        """Ask r what its cache holds (what changed since its last report) and reconcile."""
        if not r.healthy or r.leaving or r.reports is False or not self.exact or \
                r.mempool is None:
            return
        failures, sent_at = r.failures, time.monotonic()
        request = pb.CacheReportRequest(epoch=r.report_epoch, since_version=r.report_version)
        try:
            reply = await r.mempool.CacheReport(request, timeout=max(5.0, 2 * self.interval_s))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                self.stats.reports["failed"] += 1      # down or busy: the health loop decides
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
        now, stats = time.monotonic(), self.stats.reports
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
            self.stats.reports["evictions_learnt"] += 1
            self.stats.reports["evicted_tokens_learnt"] -= change
        elif change > 0:
            self.stats.reports["inserts_learnt"] += 1
            self.stats.reports["inserted_tokens_learnt"] += change

    async def report_loop(self, period_s: float) -> None:
        while True:
            results = await asyncio.gather(*(self.poll(r) for r in self.replicas),
                                           return_exceptions=True)
            for r, result in zip(self.replicas, results):
                if isinstance(result, Exception):
                    log.error("cache report of replica %s failed", r.target, exc_info=result)
            await asyncio.sleep(period_s)

    # -- GetStats -------------------------------------------------------------------------------

    def report_mode(self, r: Replica) -> str:
        """off (no reports asked for), no internal address (no MemPool to ask), pending,
        reporting or unsupported."""
        if not self.exact or self.interval_s <= 0:
            return "off"
        if r.internal is None:
            return "no internal address"
        return {None: "pending", True: "reporting", False: "unsupported"}[r.reports]

    def describe_replica(self, r: Replica) -> dict[str, Any]:
        return {"tree_tokens": self.tree.cached_tokens(r.index),
                "cache_report": self.report_mode(r), "reported_conversations": len(r.reported)}

    def describe(self) -> dict[str, Any]:
        """The tree and the cache reports, for GetStats."""
        return {"tree": {"nodes": self.tree.num_nodes(),
                         "salts": len(self.tree.salts()) - 1,     # salted trees held
                         "eviction": "replicas reporting their cache (cache_report "
                                     "'reporting'): as their reports say; others: LRU against "
                                     "each replica's cache capacity (estimated)"},
                "cache_reports": {"interval_s": self.interval_s if self.exact else 0.0,
                                  **self.stats.reports}}


__all__ = ["CacheView"]
