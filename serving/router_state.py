"""What the router keeps: replica connections and load, conversations and their exact token
history, and the tokenization it keys the prefix tree on.

Tokens. With the model's tokenizer (`load_router_tokenizer`), the router computes each turn's
prompt ids exactly as the replica's Session does (chat template, then the previous turn's exact
ids plus the newly rendered text), so the prefix tree holds the replicas' real token ids, and a
conversation moved to another replica is sent with its exact ids (ChatRequest.history_token_ids)
and continues on the identical token sequence. Without a tokenizer the tree is keyed on the
UTF-8 bytes of a plain rendering of the messages: prefixes still line up, lengths are in bytes
rather than tokens, and a moved conversation is re-encoded from its text by the replica.

Forgetting. `ConversationTable` holds the conversations (and Generate ids) in least recently
used order and bounds them: an entry idle for ttl_s is forgotten, and beyond max_entries the
least recently used idle one is. An entry with a turn in flight (busy) is never forgotten.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import time
import uuid
from typing import Any, Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2_grpc

from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Pensieve"].full_name   # what health checks ask for
ROLES = ("prefill", "decode", "both")          # what a replica does (Replica.role)


def load_router_tokenizer(model: str | None):
    """The tokenizer of `model` (random:<preset> builds it without weights), or None."""
    if not model:
        return None
    if model.startswith("random:"):
        from pensieve_jax.model.config import PRESETS
        from pensieve_jax.tokenizer import Tokenizer
        return Tokenizer.byte_level(PRESETS[model.split(":", 1)[1]].vocab_size)
    from pensieve_jax.weights import load_model
    return load_model(model).tokenizer      # loads the weights too (once, at router start)


class ChatKeys:
    """Token ids of chat turns, as the replicas compute them (or bytes without a tokenizer)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def prompt_ids(self, template: list[dict[str, str]], ids: list[int],
                   turn: list[dict[str, str]]) -> list[int]:
        """The ids of the conversation plus the new turn (Session._prompt_ids)."""
        if self.tokenizer is None:
            return list("".join(f"<|{m['role']}|>{m['content']}\n"
                                for m in template + turn).encode())
        rendered = self.tokenizer.render_chat(template + turn)
        seen = self.tokenizer.decode(ids)
        if ids and rendered.startswith(seen):
            return ids + self.tokenizer.encode(rendered[len(seen):])
        return self.tokenizer.encode(rendered)

    def generate_ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode())
        return self.tokenizer.encode(text, add_special_tokens=True)

    def raw_reply(self, text: str, ids: list[int], stop_strings: bool) -> str:
        """An assistant message as the replica's chat template saw it: the reply's ids decoded
        with special tokens kept, or its text when a stop string may have cut it."""
        if self.tokenizer is None or stop_strings:
            return text
        return self.tokenizer.decode(ids)

    def reply_ids(self, ids: list[int]) -> list[int]:
        return list(ids) if self.tokenizer is not None else []


@dataclasses.dataclass(eq=False)
class Replica:
    """One replica server: its stubs, health, load and capacity estimate."""
    index: int
    target: str
    window_s: float
    channel: grpc.aio.Channel | None = None
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
    mempool: Any = None               # pensieve.v1.MemPool stub
    # MemPool.CacheReport: None not known yet (the tree estimates), True it reports (the tree
    # follows its reports), False it does not implement it (an older server: estimated)
    reports: bool | None = None
    report_epoch: str = ""            # of the last report applied ("": ask for a full one)
    report_version: int = 0
    reported: set = dataclasses.field(default_factory=set)   # conversation ids it reported
    learnt: dict = dataclasses.field(default_factory=dict)   # id -> when routing credited it

    def connect(self) -> None:
        from serving.mempool import GRPC_OPTIONS
        self.channel = grpc.aio.insecure_channel(self.target, GRPC_OPTIONS)
        self.stub = pb_grpc.PensieveStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.mempool = pb_grpc.MemPoolStub(self.channel)

    def add_load(self, cost: float, now: float | None = None) -> None:
        self.recent.append((time.monotonic() if now is None else now, cost))

    def load(self, now: float | None = None) -> float:
        """Token-equivalents routed here within the last window_s seconds."""
        now = time.monotonic() if now is None else now
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()
        return sum(c for _, c in self.recent)


@dataclasses.dataclass(eq=False)
class Conversation:
    """A conversation the router serves. history: the client's messages; template: the same
    with assistant messages as the replicas' templates saw them; ids: its exact token ids.
    cids[r] is its conversation id on replica r, covering template[:covered[r]]. salt: the
    cache_salt it began with (tenant isolation), sent with every request for it to a replica
    and keying its prefixes in the router's tree."""
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

    def replica_ids(self) -> list[tuple[int, str]]:
        """(replica, its conversation id) of every copy the replicas hold."""
        return list(self.cids.items()) + list(self.engine_only.items())

    @classmethod
    def new(cls, history: list[dict[str, str]], salt: str = "") -> "Conversation":
        return cls(f"conv-{uuid.uuid4().hex[:16]}", list(history), list(history), salt=salt)

    def record(self, replica: int, turn: list[dict[str, str]], text: str, raw: str,
               ids: list[int]) -> None:
        """A finished (or stopped) turn on `replica`: ids are the conversation's ids after it."""
        self.history += turn + [{"role": "assistant", "content": text}]
        self.template += turn + [{"role": "assistant", "content": raw}]
        self.ids = ids
        self.home = replica
        self.covered[replica] = len(self.template)

    def forget_replica(self, replica: int) -> None:
        self.engine_only.pop(replica, None)
        self.cids.pop(replica, None)
        self.covered.pop(replica, None)
        if self.home == replica:
            self.home = None


@dataclasses.dataclass(eq=False)
class Generated:
    """A Generate call's result id: the replica and its conversation there (for
    EndConversation)."""
    replica: int
    conversation_id: str
    last_used: float = 0.0
    busy: bool = False                # recorded when its call finished: never in flight


class ConversationTable(collections.abc.Mapping):
    """id -> Conversation (or Generated), least recently used first, bounded.

    touch() adds an entry or marks it used now. An entry is expired when it is idle (not busy)
    and was last used more than ttl_s ago (None: never); `expire()` takes those out, `trim()`
    the least recently used idle ones beyond max_entries (None or 0: no cap). Busy entries are
    skipped by both, so with turns in flight the table may hold more than max_entries for a
    while. clock: seconds, monotonic (tests pass a fake one)."""

    def __init__(self, ttl_s: float | None = None, max_entries: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 or None, got {ttl_s!r}")
        if max_entries is not None and max_entries < 0:
            raise ValueError(f"max_entries must be >= 0 or None, got {max_entries!r}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries or None
        self.clock = clock
        self._items: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def __getitem__(self, key: str):
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def touch(self, key: str, entry) -> None:
        """Add `entry` as `key`, or mark it used now (the most recently used)."""
        entry.last_used = self.clock()
        self._items[key] = entry
        self._items.move_to_end(key)

    def pop(self, key: str, default=None):
        return self._items.pop(key, default)

    def is_expired(self, entry, now: float | None = None) -> bool:
        if self.ttl_s is None or entry.busy:
            return False
        return (self.clock() if now is None else now) - entry.last_used > self.ttl_s

    def expire(self) -> list:
        """Take out and return the idle entries unused for longer than ttl_s."""
        if self.ttl_s is None:
            return []
        now, out = self.clock(), []
        for key, entry in list(self._items.items()):      # oldest first
            if now - entry.last_used <= self.ttl_s:
                break                                      # the rest were used since
            if not entry.busy:
                out.append(self._items.pop(key))
        return out

    def trim(self) -> list:
        """Take out and return the least recently used idle entries beyond max_entries."""
        if self.max_entries is None or len(self._items) <= self.max_entries:
            return []
        out = []
        for key, entry in list(self._items.items()):
            if len(self._items) <= self.max_entries:
                break
            if not entry.busy:
                out.append(self._items.pop(key))
        return out

    def busy(self) -> int:
        return sum(1 for e in self._items.values() if e.busy)


@dataclasses.dataclass
class MoveCounters:
    """KV moved between replicas (MemPool transfers) or left to be recomputed."""
    transfers: int = 0
    recomputes: int = 0               # the cost model chose recomputation
    failed: int = 0                   # a transfer failed: recomputed instead
    tokens: int = 0                   # tokens whose pages were sent
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Counters:
    """Router statistics for one routing policy."""
    turns: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0            # as the replicas report (usage.cached_tokens)
    predicted_tokens: int = 0         # as the prefix tree predicted
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hit_rate"] = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return d


__all__ = ["ChatKeys", "Conversation", "ConversationTable", "Counters", "Generated",
           "MoveCounters", "ROLES", "Replica", "SERVICE_NAME", "load_router_tokenizer"]
