"""How the router reaches its replicas and on whose behalf it calls them.

Addresses: a replica is "HOST:PORT" (its public port: Chat, Generate, EndConversation,
GetStats, health) plus, for MemPool (cache reports, KV moves), its internal port:
"HOST:PORT,internal=HOST:PORT" (or "internal=PORT" on the same host). A replica given without
one is routed to without MemPool: no cache reports (the router estimates its cache from what it
routes there) and nothing moved to or from it by transfer (recomputed instead).

Credentials (`ReplicaLinks`): TLS to the replicas (a CA to trust), the cluster secret for their
internal ports, and the API key of the router's own calls (GetStats). A client's calls go on
with the client's own "authorization" (`Caller.auth`), so the replica sees the same owner; the
router checks owners too: a conversation or Generate id of another owner is NOT_FOUND.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import grpc

from serving.auth import ApiKeys, ClusterSecret, bearer_metadata, forwarded_authorization

Metadata = tuple[tuple[str, str], ...]


class ReplicaAddress(NamedTuple):
    """A replica's public address and, if known, its internal (MemPool) address."""
    target: str
    internal: str | None = None

    @classmethod
    def parse(cls, spec: "str | ReplicaAddress") -> "ReplicaAddress":
        """"HOST:PORT", "HOST:PORT,internal=HOST:PORT" or "HOST:PORT,internal=PORT"."""
        if isinstance(spec, ReplicaAddress):
            return spec
        target, *extras = [part.strip() for part in spec.split(",")]
        internal = None
        for extra in extras:
            key, _, value = extra.partition("=")
            if key != "internal" or not value:
                raise ValueError(f"replica {spec[:200]!r}: expected HOST:PORT or "
                                 "HOST:PORT,internal=[HOST:]PORT")
            internal = value if ":" in value else f"{target.rpartition(':')[0]}:{value}"
        if not target.rpartition(":")[2].isdigit():
            raise ValueError(f"replica {spec[:200]!r}: expected HOST:PORT")
        return cls(target, internal)

    def __str__(self) -> str:
        return self.target if self.internal is None else f"{self.target},internal={self.internal}"


@dataclasses.dataclass(frozen=True)
class ReplicaLinks:
    """What the router's channels to its replicas carry."""
    credentials: grpc.ChannelCredentials | None = None   # TLS (trusting the replicas' CA)
    cluster_secret: ClusterSecret | None = None          # for their internal ports
    api_key: str | None = dataclasses.field(default=None, repr=False)   # its own calls

    def own_metadata(self) -> Metadata:
        """Metadata of the router's own calls to a replica's public port."""
        return bearer_metadata(self.api_key)

    def internal_metadata(self) -> Metadata:
        """Metadata every call to a replica's internal port carries."""
        return self.cluster_secret.metadata() if self.cluster_secret is not None else ()


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a client call comes from: its owner (serving.auth; "" without keys) and its
    authorization metadata, passed on to the replicas."""
    owner: str = ""
    auth: Metadata = dataclasses.field(default=(), repr=False)     # never logged

    @classmethod
    def of(cls, context, api_keys: ApiKeys) -> "Caller":
        """The caller of a call (the interceptor has checked its key already)."""
        metadata = context.invocation_metadata()
        return cls(api_keys.owner_from_metadata(metadata), forwarded_authorization(metadata))


__all__ = ["Caller", "Metadata", "ReplicaAddress", "ReplicaLinks"]
