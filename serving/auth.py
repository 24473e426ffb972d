"""Who is calling: API keys (bearer tokens) and the owner they stand for; unguessable ids.

    keys = ApiKeys.from_options(keys=("k1",), file=None)       # + PENSIEVE_API_KEY if set
    owner = keys.owner(metadata_value)   # "authorization" header value -> owner id, or raises
                                         # Unauthenticated; "" for every caller when no key is set

An owner id is a digest of the key (never the key itself): conversations and responses belong to
the owner that created them, and any other owner is told NOT_FOUND. The same ApiKeys serves gRPC
(metadata "authorization: Bearer KEY") and HTTP (header "Authorization: Bearer KEY").

Between the servers of a cluster, `ClusterSecret` guards the internal services (MemPool, on a
server's internal port): metadata "x-pensieve-cluster-secret", compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import secrets
from typing import Iterable, Sequence

AUTHORIZATION = "authorization"          # gRPC metadata key / HTTP header (lower case)
API_KEY_ENV = "PENSIEVE_API_KEY"
ID_BYTES = 16                            # 128 random bits per generated id


class Unauthenticated(PermissionError):
    """A call without a valid API key (gRPC UNAUTHENTICATED, HTTP 401)."""


def owner_id(key: str) -> str:
    """The owner a key stands for: a digest, safe to log and to store."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def new_id(prefix: str = "") -> str:
    """An unguessable id (128 random bits), e.g. new_id("chat-")."""
    return prefix + secrets.token_hex(ID_BYTES)


def bearer_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying key (none without one)."""
    return ((AUTHORIZATION, f"Bearer {key}"),) if key else ()


def metadata_value(metadata, key: str) -> str | None:
    """The first value of `key` in gRPC metadata (a sequence of (key, value) pairs), or None."""
    for k, v in metadata or ():
        if k.lower() == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return None


def _parse_bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeys:
    """The accepted API keys. Without any, authentication is off: every caller is owner ""."""

    def __init__(self, keys: Iterable[str] = ()):
        self._keys = tuple(dict.fromkeys(k for k in keys if k))
        self._owners = {k: owner_id(k) for k in self._keys}

    @classmethod
    def from_options(cls, keys: Sequence[str] = (), file: str | os.PathLike | None = None,
                     env: dict[str, str] | None = None) -> "ApiKeys":
        """Keys from the command line, a file (one per line; blank lines and # comments
        skipped) and the PENSIEVE_API_KEY environment variable."""
        found = list(keys)
        if file is not None:
            for line in pathlib.Path(file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    found.append(line)
        value = (os.environ if env is None else env).get(API_KEY_ENV)
        if value:
            found.append(value.strip())
        return cls(found)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def keys(self) -> tuple[str, ...]:
        return self._keys

    def owner(self, authorization: str | None) -> str:
        """The owner of an "authorization" value ("Bearer KEY"); raises Unauthenticated if keys
        are set and it carries none of them. Compares in constant time."""
        if not self._keys:
            return ""
        token = _parse_bearer(authorization)
        if token is None:
            raise Unauthenticated("missing API key: send the header 'authorization: Bearer KEY'")
        match = None
        for key in self._keys:        # every key compared: the time does not tell which matched
            if hmac.compare_digest(key.encode(), token.encode()):
                match = key
        if match is None:
            raise Unauthenticated("invalid API key")
        return self._owners[match]

    def owner_from_metadata(self, metadata) -> str:
        """owner() of gRPC invocation metadata (a sequence of (key, value) pairs)."""
        return self.owner(metadata_value(metadata, AUTHORIZATION))


# -- between the servers of a cluster ------------------------------------------------------------

CLUSTER_SECRET_METADATA = "x-pensieve-cluster-secret"   # gRPC metadata on internal calls
CLUSTER_SECRET_ENV = "PENSIEVE_CLUSTER_SECRET"
OWNER_METADATA = "x-pensieve-owner"     # internal calls: the owner a moved conversation keeps


def forwarded_authorization(metadata) -> tuple[tuple[str, str], ...]:
    """The caller's "authorization" metadata, to pass on unchanged (a router to its replicas)."""
    value = metadata_value(metadata, AUTHORIZATION)
    return ((AUTHORIZATION, value),) if value else ()


class ClusterSecret:
    """The shared secret of a cluster's internal calls (MemPool), sent as metadata
    x-pensieve-cluster-secret and compared in constant time. Without a value (None or ""), a
    random one: the internal services then answer no one but this process's own peers."""

    def __init__(self, value: str | None = None):
        self.generated = not value
        self._value = value or secrets.token_urlsafe(32)

    @classmethod
    def from_options(cls, value: str | None = None,
                     env: dict[str, str] | None = None) -> "ClusterSecret":
        """--cluster-secret, else PENSIEVE_CLUSTER_SECRET, else a random secret."""
        return cls(value or (os.environ if env is None else env).get(CLUSTER_SECRET_ENV))

    @property
    def value(self) -> str:
        return self._value

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the secret."""
        return ((CLUSTER_SECRET_METADATA, self._value),)

    def check(self, metadata) -> bool | None:
        """None: no secret in the metadata; else whether it is this one (constant time)."""
        given = metadata_value(metadata, CLUSTER_SECRET_METADATA)
        if given is None:
            return None
        return hmac.compare_digest(given.encode(), self._value.encode())

    def __repr__(self) -> str:            # never the secret itself
        return f"ClusterSecret({'generated' if self.generated else 'configured'})"


def scoped_salt(owner: str, cache_salt: str | None) -> str:
    """The engine's cache salt of an owner's request: with API keys, each owner's cached
    prompts are shared only with its own requests (another key's prefix never hits, so
    cached_tokens tells nothing about other tenants); the client's cache_salt splits further.
    Without keys (owner "") the client's salt as is. Servers and routers derive it alike."""
    salt = cache_salt or ""
    return f"{owner}/{salt}" if owner else salt
