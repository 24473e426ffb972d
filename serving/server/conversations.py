"""The server's Chat conversations: each a Session (the exact token history, so the next turn
finds the whole conversation in the engine's cache) and its running turn, if any. Idle ones
expire with the engine's conversation_ttl_s."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Iterator, Mapping

from pensieve_jax.session import Session
from serving.errors import ConversationNotFound, TurnInProgress
from serving.server.worker import Worker

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Conversation:
    """A Chat conversation: its Session, when it was last used, the worker of its running turn
    (None between turns), and an event set whenever no turn runs."""
    session: Session
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    turn: Worker | None = None
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class ConversationTable(Mapping[str, Conversation]):
    """The open Chat conversations by id (a read-only mapping; the methods change it). Used on
    the server's event loop only."""

    def __init__(self, engine: "Engine", ttl: float | None):
        self.engine = engine
        self.ttl = ttl
        self._open: dict[str, Conversation] = {}

    def __getitem__(self, conversation_id: str) -> Conversation:
        return self._open[conversation_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._open)

    def __len__(self) -> int:
        return len(self._open)

    def adopt(self, conversation_id: str, cache_salt: str | None = None) -> None:
        """Open a conversation on an engine conversation that already exists (its KV was
        imported through MemPool), unless it is open already."""
        if conversation_id not in self._open:
            session = Session(self.engine, cache_salt=cache_salt)
            session.conversation_id = conversation_id
            self._open[conversation_id] = Conversation(session)

    def turn_running(self, conversation_id: str) -> bool:
        conv = self._open.get(conversation_id)
        return conv is not None and conv.turn is not None

    async def acquire(self, conversation_id: str) -> Conversation:
        """The conversation, free for a new turn (waiting out a cancelled turn's end)."""
        while True:
            conv = self._open.get(conversation_id)
            if conv is not None and conv.turn is None and self._expired(conv):
                await self.forget(conversation_id)
                conv = None
            if conv is None:
                raise ConversationNotFound(f"no conversation {conversation_id!r}: it was never "
                                           "started, was ended, or expired")
            if conv.turn is None:
                return conv
            if not conv.turn.cancelled:
                raise TurnInProgress(f"conversation {conversation_id!r} has a turn in progress; "
                                     "send the next turn after it finished")
            await conv.idle.wait()

    def begin(self, conv: Conversation, worker: Worker) -> None:
        """conv's turn runs on worker. When the worker is done, a conversation that was never
        accepted (bad input, or cancelled before the engine took it) or was ended meanwhile
        frees its cache."""
        conv.turn = worker
        conv.idle.clear()
        worker.done.add_done_callback(lambda _: self._worker_done(conv, worker))

    def accept(self, conv: Conversation) -> None:
        """The engine took conv's turn: the conversation is open (if it was not)."""
        self._open.setdefault(conv.session.conversation_id, conv)

    def turn_ended(self, conv: Conversation, worker: Worker) -> None:
        """worker's turn of conv is over: the conversation is free for the next."""
        if conv.turn is worker:
            conv.turn = None
            conv.last_used = time.monotonic()
            conv.idle.set()

    def _worker_done(self, conv: Conversation, worker: Worker) -> None:
        self.turn_ended(conv, worker)
        session = conv.session
        if self._open.get(session.conversation_id) is not conv:
            asyncio.get_running_loop().run_in_executor(None, session.close)

    def _expired(self, conv: Conversation) -> bool:
        return self.ttl is not None and time.monotonic() - conv.last_used > self.ttl

    async def forget(self, conversation_id: str) -> None:
        """Close the conversation (its Session frees its cache), if open."""
        conv = self._open.pop(conversation_id, None)
        if conv is not None:
            await asyncio.to_thread(conv.session.close)

    async def expire_loop(self) -> None:
        """Forget conversations idle for longer than ttl (runs until cancelled)."""
        period = min(max(self.ttl / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            for cid, conv in list(self._open.items()):
                if conv.turn is None and self._expired(conv):
                    try:
                        await self.forget(cid)
                    except Exception:  # keep expiring the others
                        log.exception("ending expired conversation %s failed", cid)
