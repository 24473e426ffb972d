"""The router's errors: a call no healthy replica can take (`NoReplica`, UNAVAILABLE to the
client), a replica's error passed on to the client as it is (`_Remote`), a turn a replica
aborted on its own (`_ReplicaAbort`, handled like UNAVAILABLE), and the status codes that mark a
replica down and run the call on another one (`_RETRY`).
"""

from __future__ import annotations

import grpc

_RETRY = (grpc.StatusCode.UNAVAILABLE,)


class NoReplica(RuntimeError):
    """No healthy replica can take the call."""


class _Remote(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _ReplicaAbort(Exception):
    """A replica ended a turn with finish_reason "abort" that the router did not ask for."""

    def __init__(self, target: str):
        super().__init__(f"replica {target} aborted the turn (shutting down?)")

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return str(self)


__all__ = ["NoReplica"]
