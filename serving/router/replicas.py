"""The replica set: each replica server's connection, health, role and load.

Health: every health_period_s the router asks each replica's gRPC health service. One that
fails, or answers NOT_SERVING (a replica still warming up, or shutting down), is marked down and
gets no calls; one that answers SERVING again is marked up. While a replica is healthy its
GetStats gives its cache capacity (the tree's LRU capacity estimate) and, unless the router was
given its role, its role. Parts that keep state per replica (the cache view) `watch` the set and
hear of each replica going down, coming up and being measured.

Retries: the channel's service config (`SERVICE_CONFIG`) retries the idempotent unary calls
the router makes of a replica (GetStats, EndConversation, MemPool.Match and CacheReport) on
UNAVAILABLE, with backoff. Chat and Generate are not retried on the same replica: the router
fails them over to another one (serving/router/chat.py), which is its own logic. Health checks
are not retried either: a failed one is what marks a replica down.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
from typing import Any, Iterator, Protocol, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.channels import aio_channel
from serving.mempool import GRPC_OPTIONS, MEMPOOL_SERVICE
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.router.links import ReplicaAddress, ReplicaLinks

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Pensieve"].full_name   # what health checks ask for
ROLES = ("prefill", "decode", "both")          # what a replica does (Replica.role)
RETRIED = ((SERVICE_NAME, "GetStats"), (SERVICE_NAME, "EndConversation"),
           (MEMPOOL_SERVICE, "Match"), (MEMPOOL_SERVICE, "CacheReport"))
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": s, "method": m} for s, m in RETRIED],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})
CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.enable_retries", 1),
                   ("grpc.service_config", SERVICE_CONFIG)]

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Replica:
    """One replica server: its stubs, health, load and capacity estimate, and where the cache
    view stands with its cache reports."""
    index: int
    target: str
    window_s: float
    internal: str | None = None       # its internal (MemPool) address; None: MemPool unused
    channel: grpc.aio.Channel | None = None
    internal_channel: grpc.aio.Channel | None = None
    stub: Any = None
    health: Any = None
    healthy: bool = True
    in_flight: int = 0
    routed: int = 0
    failures: int = 0
    capacity: int = 0                 # cache capacity in tokens (pages x page_size), 0: unknown
    recent: collections.deque = dataclasses.field(default_factory=collections.deque)
    role: str = "both"                # prefill | decode | both (disaggregation)
    role_fixed: bool = False          # given to the router (else learned from GetStats)
    leaving: bool = False             # evacuated: never marked up again
    mempool: Any = None               # pensieve.v1.MemPool stub (None: no internal address)
    # MemPool.CacheReport: None not known yet (the tree estimates), True it reports (the tree
    # follows its reports), False it does not implement it (an older server: estimated)
    reports: bool | None = None
    report_epoch: str = ""            # of the last report applied ("": ask for a full one)
    report_version: int = 0
    reported: set = dataclasses.field(default_factory=set)   # conversation ids it reported
    learnt: dict = dataclasses.field(default_factory=dict)   # id -> when routing credited it

    def connect(self, links: ReplicaLinks = ReplicaLinks()) -> None:
        self.channel = aio_channel(self.target, CHANNEL_OPTIONS, links.credentials)
        self.stub = pb_grpc.PensieveStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        if self.internal is not None:
            self.internal_channel = aio_channel(self.internal, CHANNEL_OPTIONS, links.credentials,
                                                links.internal_metadata())
            self.mempool = pb_grpc.MemPoolStub(self.internal_channel)

    async def close(self) -> None:
        for channel in (self.channel, self.internal_channel):
            if channel is not None:
                await channel.close()

    def add_load(self, cost: float, now: float | None = None) -> None:
        self.recent.append((time.monotonic() if now is None else now, cost))

    def load(self, now: float | None = None) -> float:
        """Token-equivalents routed here within the last window_s seconds."""
        now = time.monotonic() if now is None else now
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()
        return sum(c for _, c in self.recent)


class ReplicaWatcher(Protocol):
    """What a part keeping state per replica hears from the `ReplicaSet`."""

    def replica_down(self, replica: Replica) -> None:
        """`replica` was marked down: what it held is gone (or will be asked for anew)."""

    def replica_up(self, replica: Replica) -> None:
        """`replica` answers its health checks again."""

    def replica_measured(self, replica: Replica) -> None:
        """`replica`'s capacity (and role) were read from its GetStats."""


class ReplicaSet(Sequence[Replica]):
    """The replicas behind the router, by index, with their health checks."""

    def __init__(self, targets: Sequence[str | ReplicaAddress], window_s: float = 60.0,
                 roles: Sequence[str] | None = None, links: ReplicaLinks = ReplicaLinks()):
        if roles is not None and (len(roles) != len(targets) or set(roles) - set(ROLES)):
            raise ValueError(f"roles must be one of {ROLES} per replica, got {roles!r}")
        if not targets:
            raise ValueError("the router needs at least one replica target")
        addresses = [ReplicaAddress.parse(t) for t in targets]
        self._replicas = [Replica(i, a.target, window_s, a.internal)
                          for i, a in enumerate(addresses)]
        self.links = links
        for r, role in zip(self._replicas, roles or ()):
            r.role, r.role_fixed = role, True
        self._watchers: list[ReplicaWatcher] = []

    def __getitem__(self, index):
        return self._replicas[index]

    def __len__(self) -> int:
        return len(self._replicas)

    def __iter__(self) -> Iterator[Replica]:
        return iter(self._replicas)

    def watch(self, watcher: ReplicaWatcher) -> None:
        self._watchers.append(watcher)

    def connect(self) -> None:
        for r in self._replicas:
            r.connect(self.links)
        for r in self._replicas:
            if r.mempool is None:
                log.warning("replica %s (%s): no internal address (--replica HOST:PORT,"
                            "internal=PORT): no cache reports, no KV moves to or from it",
                            r.index, r.target)

    async def close(self) -> None:
        for r in self._replicas:
            await r.close()

    def healthy(self, roles: Sequence[str] = ROLES) -> list[Replica]:
        """The healthy replicas of the given roles."""
        return [r for r in self._replicas if r.healthy and r.role in roles]

    def disaggregated(self) -> bool:
        """Some healthy replica only prefills and some healthy replica decodes."""
        up = {r.role for r in self._replicas if r.healthy}
        return "prefill" in up and bool(up & {"decode", "both"})

    def mark_down(self, replica: Replica, why: str) -> None:
        """Take `replica` out of routing until its health checks pass again."""
        if not replica.healthy:
            return
        log.warning("replica %s (%s) is down: %s", replica.index, replica.target, why)
        replica.healthy = False
        replica.failures += 1
        for w in self._watchers:
            w.replica_down(replica)

    def leave(self, index: int) -> Replica:
        """Replica `index` is leaving (graceful shutdown): down for good."""
        replica = self._replicas[index]
        replica.leaving = True
        self.mark_down(replica, "leaving (evacuated)")
        return replica

    async def stats(self, replica: Replica) -> pb.GetStatsResponse | None:
        """The replica's GetStats, or None (down, or it failed)."""
        if not replica.healthy:
            return None
        try:
            return await replica.stub.GetStats(pb.GetStatsRequest(), timeout=5,
                                               metadata=self.links.own_metadata() or None)
        except grpc.aio.AioRpcError:
            return None

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
            for w in self._watchers:
                w.replica_up(r)
        r.healthy = True
        s = await self.stats(r)
        if s is not None:
            pages = json.loads(s.stats_json)
            size, tiers = pages.get("page_size", 0), pages["pages"]
            r.capacity = size * (tiers["device"]["total"] + tiers["host"]["total"])
            if not r.role_fixed and pages.get("role") in ROLES:
                r.role = pages["role"]
            for w in self._watchers:
                w.replica_measured(r)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self._replicas), return_exceptions=True)

    async def health_loop(self, period_s: float) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(period_s)

    def describe(self, now: float) -> list[dict[str, Any]]:
        """Each replica's routing state, for GetStats."""
        return [{"target": r.target, "internal": r.internal, "healthy": r.healthy, "routed": r.routed, "role": r.role,
                 "leaving": r.leaving, "in_flight": r.in_flight, "load": r.load(now),
                 "failures": r.failures, "capacity_tokens": r.capacity}
                for r in self._replicas]


__all__ = ["CHANNEL_OPTIONS", "ROLES", "Replica", "ReplicaSet", "ReplicaWatcher",
           "SERVICE_CONFIG", "SERVICE_NAME"]
