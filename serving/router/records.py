"""What the router remembers per conversation: a chat `Conversation` (its history, exact token
ids and copies on the replicas) and a Generate call's result id (`Generated`)."""

from __future__ import annotations

import dataclasses
import time

from serving.auth import new_id, scoped_salt
from serving.router.links import Caller


@dataclasses.dataclass(eq=False)
class Conversation:
    """A conversation the router serves. history: the client's messages; template: the same
    with assistant messages as the replicas' templates saw them; ids: its exact token ids.
    cids[r] is its conversation id on replica r, covering template[:covered[r]]. salt: the
    cache_salt it began with (tenant isolation), sent with every request for it to a replica
    and keying its prefixes in the router's tree. caller: who started it (its owner; the
    authorization the router's own calls for it carry, e.g. ending its copies)."""
    id: str
    history: list[dict[str, str]]
    template: list[dict[str, str]]
    ids: list[int] = dataclasses.field(default_factory=list)
    home: int | None = None
    cids: dict[int, str] = dataclasses.field(default_factory=dict)
    covered: dict[int, int] = dataclasses.field(default_factory=dict)
    busy: bool = False                # a turn in flight: never forgotten
    last_used: float = dataclasses.field(default_factory=time.monotonic)   # set by the table
    engine_only: dict[int, str] = dataclasses.field(default_factory=dict)   # prefill copies
    dropped: bool = False             # forgotten (ended, expired, evicted): not to come back
    salt: str = ""                    # ChatRequest.cache_salt of its first turn ("": none)
    caller: Caller = Caller()

    def replica_ids(self) -> list[tuple[int, str]]:
        """(replica, its conversation id) of every copy the replicas hold."""
        return list(self.cids.items()) + list(self.engine_only.items())

    @property
    def owner(self) -> str:
        return self.caller.owner

    @property
    def engine_salt(self) -> str:
        """The salt the replicas' engines file its KV under (serving.auth.scoped_salt): what
        keys its prefixes in the router's tree and its KV moves."""
        return scoped_salt(self.caller.owner, self.salt)

    @classmethod
    def new(cls, history: list[dict[str, str]], salt: str = "",
            caller: Caller = Caller()) -> "Conversation":
        """A conversation with an unguessable id (128 random bits)."""
        return cls(new_id("conv-"), list(history), list(history), salt=salt, caller=caller)

    def record(self, replica: int, turn: list[dict[str, str]], text: str, raw: str,
               ids: list[int]) -> None:
        """A finished (or stopped) turn on `replica`: ids are the conversation's ids after it."""
        self.history += turn + [{"role": "assistant", "content": text}]
        self.template += turn + [{"role": "assistant", "content": raw}]
        self.ids = ids
        self.home = replica
        self.covered[replica] = len(self.template)

    def adopted(self, replica: int, replica_cid: str) -> None:
        """Its KV was pushed to `replica` as conversation replica_cid there: the next Chat
        there sends the messages again, with the exact ids (a new copy covers nothing yet)."""
        if self.cids.get(replica) != replica_cid:
            self.cids[replica] = replica_cid
            self.covered[replica] = 0

    def forget_replica(self, replica: int) -> None:
        """The copy on `replica` is gone (the replica failed, or forgot it)."""
        self.engine_only.pop(replica, None)
        self.cids.pop(replica, None)
        self.covered.pop(replica, None)
        if self.home == replica:
            self.home = None


@dataclasses.dataclass(eq=False)
class Generated:
    """A Generate call's result id: the replica and its conversation there (for
    EndConversation), and who ran it."""
    replica: int
    conversation_id: str
    last_used: float = 0.0
    busy: bool = False                # recorded when its call finished: never in flight
    caller: Caller = Caller()


__all__ = ["Conversation", "Generated"]
