"""Who sent an HTTP request: the owner its API key stands for, and the gRPC metadata that
carries the key on to the target.

With `api_keys` set, a missing or wrong key is a 401 at once (no gRPC call). Without them, the
key (if any) still goes on to the target, which may check keys itself, and the owner is the
key's digest (owner "" without a key), so stored responses stay apart per key either way.
"""

from __future__ import annotations

import dataclasses

from starlette.requests import Request

from serving.auth import AUTHORIZATION, ApiKeys, Unauthenticated, bearer_metadata, owner_id
from serving.http.errors import unauthorized


@dataclasses.dataclass(frozen=True)
class Caller:
    owner: str                               # serving.auth owner id ("" without a key)
    metadata: tuple[tuple[str, str], ...]    # gRPC metadata for the target's calls


def bearer_token(header: str | None) -> str | None:
    """The KEY of "Bearer KEY" (None if absent or another scheme)."""
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def identify(request: Request, api_keys: ApiKeys | None) -> Caller:
    """The caller of `request`; 401 when api_keys are enabled and the key is missing/wrong."""
    header = request.headers.get(AUTHORIZATION)
    token = bearer_token(header)
    if api_keys is not None and api_keys.enabled:
        try:
            owner = api_keys.owner(header)
        except Unauthenticated as e:
            raise unauthorized(str(e)) from None
    else:
        owner = owner_id(token) if token else ""
    return Caller(owner, bearer_metadata(token))
