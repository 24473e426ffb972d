"""The router's errors: a call no healthy replica can take (`NoReplica`, UNAVAILABLE to the
client), a replica's error passed on to the client as it is (`RemoteError`), a turn a replica
aborted on its own (`ReplicaAbort`, handled like UNAVAILABLE), and the status codes on which the
router marks a replica down and runs the call on another one (`FAILOVER_CODES`).
"""

from __future__ import annotations

import grpc

FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE,)


class NoReplica(RuntimeError):
    """No healthy replica can take the call."""


class RemoteError(Exception):
    """A replica's status, to be passed on to the client unchanged."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class ReplicaAbort(Exception):
    """A replica ended a turn with finish_reason "abort" that the router did not ask for. Reads
    like a grpc.aio.AioRpcError (code(), details()) so both are handled alike."""

    def __init__(self, target: str):
        super().__init__(f"replica {target} aborted the turn (shutting down?)")

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return str(self)


__all__ = ["FAILOVER_CODES", "NoReplica", "RemoteError", "ReplicaAbort"]
