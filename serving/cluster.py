"""A local cluster: N replica servers plus the router in front of them.

    pensieve cluster --replicas 3 --model random:tiny --port 50051 [--policy e2]
    pensieve cluster --prefill 1 --decode 2 --model random:tiny     # disaggregated

In-process (the default): the model is loaded once and each replica is its own Engine (own
KV pool, own engine thread) on those weights, served on a loopback port, all on one event loop
with the router. `--subprocess`: each replica is a `pensieve serve` process; on a machine with
GPUs replica i sees only GPU i % n (CUDA_VISIBLE_DEVICES).

Each replica opens its port with gRPC health NOT_SERVING while its engine compiles its programs
(serving/server/warm_up.py); `start()` returns, and the router takes calls, once every replica
reports SERVING.

Security: the replicas listen on loopback only (public and internal ports), whatever --host the
router binds. They accept the router's API keys (the router passes each caller's key on, so
conversations keep their owner across replicas) and share a cluster secret made at random for
this cluster (their internal ports, the router's MemPool calls); each may push KV to the others'
internal ports only. TLS (tls) is the router's public port's; the replicas' messages may be up
to REPLICA_MAX_REQUEST_BYTES (the router sends them whole histories).

    with BackgroundCluster(ClusterConfig("random:tiny", replicas=3)) as cluster:
        client = serving.client.connect(cluster.target)
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any, Callable

from serving.auth import ApiKeys, ClusterSecret
from serving.limits import MIB, Limits
from serving.replica_processes import LOOPBACK, ReplicaProcesses
from serving.router import MAX_CONVERSATIONS, E2Config, RouterServer, load_router_tokenizer
from serving.router.links import ReplicaAddress, ReplicaLinks
from serving.tls import ServerTls

REPLICA_MAX_REQUEST_BYTES = 64 * MIB    # a replica's request cap: the router's calls only


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    model: str = "random:tiny"
    replicas: int = 3
    policy: str = "e2"
    host: str = "127.0.0.1"
    port: int = 0                        # the router's port (0: a free one)
    dtype: str = "float32"
    engine_options: tuple[tuple[str, Any], ...] = ()   # EngineConfig fields
    subprocess: bool = False
    gpus: int = 0                        # subprocess mode: pin replica i to GPU i % gpus
    health_period_s: float = 1.0
    e2: E2Config = E2Config()
    prefill: int = 0                     # prefill-only replicas (disaggregation)
    decode: int = 0                      # decode-only replicas
    kv_move: str = "auto"                # moved conversations: auto | transfer | recompute
    cache_report_interval_s: float = 1.0     # the router polls MemPool.CacheReport (0: never)
    # the router forgets conversations idle this long (None: the replicas' conversation_ttl_s
    # from engine_options, if any) and beyond this many (0: no cap)
    conversation_ttl_s: float | None = None
    max_conversations: int = MAX_CONVERSATIONS
    # callers' keys (the router's and the replicas'); none: no authentication
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    tls: ServerTls | None = None         # the router's public port
    max_request_bytes: int = Limits().max_request_bytes   # the router's request cap

    @property
    def router_ttl_s(self) -> float | None:
        if self.conversation_ttl_s is not None:
            return self.conversation_ttl_s
        return dict(self.engine_options).get("conversation_ttl_s")

    @property
    def roles(self) -> tuple[str, ...]:
        """Each replica's role: prefill ones first, then decode ones, then the others."""
        return ("prefill",) * self.prefill + ("decode",) * self.decode + ("both",) * self.replicas


class Cluster:
    """Replicas and router on the running event loop. loaded_model: reuse these weights for the
    in-process replicas instead of loading config.model."""

    def __init__(self, config: ClusterConfig, loaded_model=None):
        if min(config.replicas, config.prefill, config.decode) < 0 or not config.roles:
            raise ValueError(f"a cluster needs at least one replica, got {config.replicas} "
                             f"(+ {config.prefill} prefill, {config.decode} decode)")
        self.config = config
        self.loaded_model = loaded_model
        self.engines: list = []
        self.servers: list = []
        self.processes: ReplicaProcesses | None = None
        self.addresses: list[ReplicaAddress] = []
        self.api_keys = ApiKeys(config.api_keys)
        self.secret = ClusterSecret()            # random, this cluster's own
        self.router: RouterServer | None = None

    @property
    def targets(self) -> list[str]:
        """The replicas' public addresses."""
        return [a.target for a in self.addresses]

    @property
    def internal_targets(self) -> list[str]:
        """The replicas' internal (MemPool) addresses."""
        return [a.internal for a in self.addresses]

    @property
    def target(self) -> str:
        return self.router.target

    async def start(self) -> str:
        c = self.config
        if c.subprocess:
            tokenizer = await asyncio.to_thread(load_router_tokenizer, c.model)
            self.processes = ReplicaProcesses(c.model, c.dtype, c.roles, dict(c.engine_options),
                                              self.secret, self.api_keys, c.gpus,
                                              REPLICA_MAX_REQUEST_BYTES)
            self.addresses = await asyncio.to_thread(self.processes.spawn)
        else:
            tokenizer = await self._start_in_process()
        keys = self.api_keys.keys
        links = ReplicaLinks(cluster_secret=self.secret, api_key=keys[0] if keys else None)
        self.router = RouterServer(self.addresses, c.policy, tokenizer, c.host, c.port,
                                   c.health_period_s, tls=c.tls,
                                   max_request_bytes=c.max_request_bytes, e2=c.e2,
                                   kv_move=c.kv_move, roles=c.roles,
                                   cache_report_interval_s=c.cache_report_interval_s,
                                   conversation_ttl_s=c.router_ttl_s,
                                   max_conversations=c.max_conversations,
                                   api_keys=self.api_keys, links=links)
        await self.router.start()
        return self.router.target

    async def _start_in_process(self):
        from pensieve_jax.engine.engine import Engine, EngineConfig
        from pensieve_jax.weights import load_model
        from serving.server import PensieveServer, warm_up_later
        c = self.config
        limits = Limits(max_request_bytes=REPLICA_MAX_REQUEST_BYTES)
        model = self.loaded_model or await asyncio.to_thread(load_model, c.model, c.dtype)
        options, warm_up = warm_up_later(dict(c.engine_options))
        options = EngineConfig(**options)
        for i, role in enumerate(c.roles):
            engine = Engine(model, c.dtype, options)
            server = PensieveServer(engine, LOOPBACK, 0, model_name=c.model, role=role,
                                    warm_up=warm_up, api_keys=self.api_keys, limits=limits,
                                    cluster_secret=self.secret.value)
            await server.start()             # warms up in the background
            self.engines.append(engine)
            self.servers.append(server)
            self.addresses.append(ReplicaAddress(server.target, server.internal_target))
            if i == 0:   # the others then load its programs from the persistent compile cache
                await server.wait_ready()
        for server in self.servers:          # each may push KV to the others
            server.internal.allow_peers(self.internal_targets)
        await asyncio.gather(*(s.wait_ready() for s in self.servers))
        return model.tokenizer

    async def stop_replica(self, index: int, grace: float = 0.0) -> None:
        """Stop one replica (its calls then fail UNAVAILABLE), as if its machine went away."""
        if self.processes is not None:
            await asyncio.to_thread(self.processes.stop, index)
            return
        await self.servers[index].shutdown(grace)
        await asyncio.to_thread(self.engines[index].shutdown)

    async def drain_replica(self, index: int, grace: float = 5.0) -> int:
        """Gracefully take one replica out: the router moves its conversations' KV to other
        replicas (MemPool transfers, or recomputation where cheaper), then it stops. Returns
        how many conversations moved by transfer."""
        moved = await self.router.service.evacuate(index)
        await self.stop_replica(index, grace)
        return moved

    async def shutdown(self, grace: float = 5.0) -> None:
        if self.router is not None:
            await self.router.shutdown(grace)
        for server in self.servers:
            await server.shutdown(grace)
        for engine in self.engines:
            await asyncio.to_thread(engine.shutdown)
        if self.processes is not None:
            await asyncio.to_thread(self.processes.stop_all)


class BackgroundCluster:
    """A Cluster on its own thread and event loop (tests, benchmarks, notebooks)."""

    def __init__(self, config: ClusterConfig, loaded_model=None):
        self.cluster = Cluster(config, loaded_model)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pensieve-cluster",
                                        daemon=True)
        self._thread.start()
        try:
            self.run(self.cluster.start())
        except BaseException:
            self.stop()
            raise

    def run(self, coro) -> Any:
        """Run a coroutine on the cluster's loop; returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run():
            return fn()
        return self.run(run())

    @property
    def target(self) -> str:
        return self.cluster.target

    @property
    def router(self):
        return self.cluster.router.service

    def stop_replica(self, index: int) -> None:
        self.run(self.cluster.stop_replica(index))

    def drain_replica(self, index: int) -> int:
        return self.run(self.cluster.drain_replica(index))

    def stop(self, grace: float = 1.0) -> None:
        if self._thread.is_alive():
            self.run(self.cluster.shutdown(grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> "BackgroundCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["BackgroundCluster", "Cluster", "ClusterConfig"]
