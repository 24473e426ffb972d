"""A server's internal port: the MemPool service (KV reports, export, import, transfer), never on
the public port, for the other servers of a cluster only.

    pensieve serve ... --internal-port 50061 [--internal-host 127.0.0.1]
                       --cluster-secret SECRET (or PENSIEVE_CLUSTER_SECRET)
                       --peer 10.0.0.2:50061 --peer 10.0.0.3:50061 [--peer-tls-ca ca.pem]

- It binds loopback (127.0.0.1) unless --internal-host says otherwise, on a free port unless
  --internal-port names one ("pensieve: internal services on HOST:PORT" says where).
- Every call needs the cluster secret (metadata x-pensieve-cluster-secret): none is
  UNAUTHENTICATED, a wrong one PERMISSION_DENIED. Without --cluster-secret a random secret is
  made and shown nowhere: the internal services then answer nobody (a router in front of this
  server routes without cache reports and recomputes what it moves). Routers and peers that
  should use them get the same secret.
- Transfer pushes KV only to the configured peers (their internal addresses, exactly as the
  router names them); any other target is PERMISSION_DENIED.
- With TLS (--tls-cert/--tls-key) the internal port uses the same certificate; transfers to
  peers use TLS when --peer-tls-ca gives the CA to trust.
- Its messages may be large (KV pages): up to serving.mempool.MAX_MESSAGE_BYTES.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grpc

from serving.auth import ClusterSecret
from serving.mempool import GRPC_OPTIONS, MemPoolService
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.interceptors import cluster_secret_guard
from serving.tls import Pem, ServerTls, channel_credentials

LOOPBACK = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class InternalOptions:
    """Where a server's internal services listen, and the peers they may push KV to."""
    host: str = LOOPBACK
    port: int = 0                          # 0: a free port
    peers: tuple[str, ...] = ()            # Transfer targets: the peers' internal HOST:PORT
    peer_tls_ca: Pem | None = None         # trust this CA on transfers to peers (TLS)


def peer_credentials(options: InternalOptions) -> grpc.ChannelCredentials | None:
    """The credentials of transfers to peers (TLS trusting peer_tls_ca), or None: plaintext."""
    return channel_credentials(options.peer_tls_ca)


class InternalServer:
    """MemPool on its own grpc.aio server, behind the cluster secret."""

    def __init__(self, mempool: MemPoolService, options: InternalOptions,
                 secret: ClusterSecret, tls: ServerTls | None = None):
        self.mempool = mempool
        self.options = options
        self.secret = secret
        self.tls = tls
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"{self.options.host}:{self.port}"

    async def start(self) -> int:
        server = grpc.aio.server(options=GRPC_OPTIONS,
                                 interceptors=[cluster_secret_guard(self.secret)])
        pb_grpc.add_MemPoolServicer_to_server(self.mempool, server)
        address = f"{self.options.host}:{self.options.port}"
        self.port = server.add_secure_port(address, self.tls.credentials()) \
            if self.tls is not None else server.add_insecure_port(address)
        await server.start()
        self._server = server
        return self.port

    def allow_peers(self, targets: Sequence[str]) -> None:
        """Let Transfer push to these internal addresses too (a cluster, once all are up)."""
        self.mempool.allow_peers(targets)

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


__all__ = ["InternalOptions", "InternalServer", "LOOPBACK", "peer_credentials"]
