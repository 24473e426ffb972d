"""The server's conversations: its Chat conversations, each a Session (the exact token history,
so the next turn finds the whole conversation in the engine's cache) and its running turn, if
any; and the engine conversations its Generate calls ran in. Idle ones expire with the engine's
conversation_ttl_s.

Owners: each conversation belongs to the owner that created it (serving.auth; "" for every
caller without API keys). To any other owner it does not exist: NOT_FOUND, with the message a
missing id gets (`not_found`).

What a client was sent: after a turn that was cancelled, failed or passed its deadline, the
Session keeps exactly the chunks that went out (`Delivery`): `Session.truncate_reply`, or
`Session.undo_turn` when the client never learned that the turn was accepted. A conversation is
free for its next turn once its worker thread and its call are both done.

max_conversations (serving.limits.Limits; None: no cap): the table holds at most that many
conversations: the Chat ones, the Generate ones, and the new ones being started. When a new one
would exceed it, the least recently used idle one is ended first (its Session closed, or its
engine conversation ended: its cache is freed); when every one is busy, the new one is refused
with RESOURCE_EXHAUSTED (TooManyConversations).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Iterator, Mapping

from pensieve_jax.session import Session
from serving.errors import ConversationNotFound, TooManyConversations, TurnInProgress, clip
from serving.server.worker import Worker

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

log = logging.getLogger(__name__)

BUSY_GRACE_S = 0.2
MAX_GENERATED = 100_000       # Generate conversations whose owners are remembered


def not_found(conversation_id: str) -> ConversationNotFound:
    """The error for an id that is missing, or another owner's (the same for both)."""
    return ConversationNotFound(f"no conversation {clip(conversation_id)}: it was never "
                                "started, was ended, or expired")


@dataclasses.dataclass
class Delivery:
    """What a Chat call sent of its turn: whether the client learned that the turn was accepted,
    the token ids and text of the chunks that went out, and whether the call is over (final)."""
    turns_before: int                 # the Session's recorded turns before this one
    accepted: bool = False
    tokens: int = 0
    pieces: list[str] = dataclasses.field(default_factory=list)
    final: bool = False

    def sent(self, text: str, token_ids) -> None:
        self.tokens += len(token_ids)
        self.pieces.append(text)

    def apply(self, session: Session) -> None:
        """Make the Session's record of the turn exactly what was sent."""
        if session.turns <= self.turns_before:
            return                    # nothing recorded: refused before the engine took it
        if self.accepted:
            session.truncate_reply(self.tokens, "".join(self.pieces))
        else:
            session.undo_turn()


@dataclasses.dataclass(eq=False)
class Conversation:
    """A Chat conversation: its Session, its owner, when it was last used, the worker of its
    running turn and what its call sent (None between turns), and an event set whenever no turn
    runs."""
    session: Session
    owner: str = ""
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    turn: Worker | None = None
    delivery: Delivery | None = None
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class ConversationTable(Mapping[str, Conversation]):
    """The open Chat conversations by id (a read-only mapping; the methods change it), and the
    Generate calls' engine conversations (`generated`: id -> owners, least recently used
    first). Used on the server's event loop only."""

    def __init__(self, engine: "Engine", ttl: float | None, max_conversations: int | None = None):
        self.engine = engine
        self.ttl = ttl
        self.max_conversations = max_conversations
        self.generated: collections.OrderedDict[str, tuple[set[str], float]] = \
            collections.OrderedDict()
        self._open: dict[str, Conversation] = {}
        self._starting: set[Conversation] = set()    # new, the engine has not taken them yet
        self._generating = 0                          # Generate calls running
        self.kept = None             # --state-dir: serving/server/state.py's KeptConversations

    def __getitem__(self, conversation_id: str) -> Conversation:
        return self._open[conversation_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._open)

    def __len__(self) -> int:
        return len(self._open)

    @property
    def held(self) -> int:
        """Conversations counted against max_conversations."""
        return len(self._open) + len(self._starting) + self._generating + len(self.generated)

    def make_room(self, strict: bool = True) -> None:
        """Room for one more conversation under max_conversations: the least recently used idle
        ones are ended meanwhile. TooManyConversations if every one is busy (strict)."""
        while self.max_conversations is not None and self.held >= self.max_conversations:
            idle = [c for c in self._open.values() if c.turn is None]
            oldest = min(idle, key=lambda c: c.last_used, default=None)
            gen = next(iter(self.generated.items()), None)
            if gen is not None and (oldest is None or gen[1][1] <= oldest.last_used):
                self._end_generated(gen[0])
            elif oldest is not None:
                self._close(self._open.pop(oldest.session.conversation_id))
            elif strict:
                raise TooManyConversations(
                    f"the server holds {self.held} conversations, all busy; the limit is "
                    f"{self.max_conversations} (max_conversations)")
            else:
                return

    def _close(self, conv: Conversation) -> None:
        asyncio.get_running_loop().run_in_executor(None, self._end, conv)

    def _end(self, conv: Conversation) -> None:
        if self.kept is not None:
            self.kept.forget(conv.session.conversation_id)
        conv.session.close()

    def _end_generated(self, conversation_id: str) -> None:
        self.generated.pop(conversation_id, None)
        asyncio.get_running_loop().run_in_executor(None, self.engine.end_conversation,
                                                   conversation_id)

    # -- Chat conversations -------------------------------------------------------------------

    def adopt(self, conversation_id: str, cache_salt: str | None = None, owner: str = "") -> None:
        """Open a conversation of `owner` on an engine conversation that already exists (its KV
        was imported through MemPool), unless it is open already."""
        if conversation_id not in self._open:
            self.make_room(strict=False)
            session = Session(self.engine, cache_salt=cache_salt)
            session.conversation_id = conversation_id
            self._open[conversation_id] = Conversation(session, owner)

    def turn_running(self, conversation_id: str) -> bool:
        conv = self._open.get(conversation_id)
        return conv is not None and conv.turn is not None

    async def acquire(self, conversation_id: str, owner: str = "") -> Conversation:
        """owner's conversation, free for a new turn (waiting out a cancelled turn's end). A
        running turn gets BUSY_GRACE_S to be cancelled: a client that cancels its call and
        sends the next turn at once may be heard in either order."""
        grace = time.monotonic() + BUSY_GRACE_S
        while True:
            conv = self._open.get(conversation_id)
            if conv is not None and conv.turn is None and self._expired(conv):
                await self.forget(conversation_id)
                conv = None
            if conv is None or conv.owner != owner:
                raise not_found(conversation_id)
            if conv.turn is None:
                return conv
            if conv.turn.cancelled:
                await conv.idle.wait()
            elif time.monotonic() < grace:
                await asyncio.sleep(0.01)
            else:
                raise TurnInProgress(f"conversation {clip(conversation_id)} has a turn in "
                                     "progress; send the next turn after it finished")

    def begin(self, conv: Conversation, worker: Worker, delivery: Delivery) -> None:
        """conv's turn runs on worker, its call's chunks counted in delivery. A conversation
        that the engine never took (bad input, or cancelled first) or that was ended meanwhile
        frees its cache once the turn is over."""
        conv.turn, conv.delivery = worker, delivery
        conv.idle.clear()
        if conv.session.conversation_id not in self._open:
            self._starting.add(conv)
        worker.done.add_done_callback(lambda _: self._settle(conv, worker))

    def accept(self, conv: Conversation) -> None:
        """The client learned that the engine took conv's turn: the conversation is open."""
        self._starting.discard(conv)
        self._open.setdefault(conv.session.conversation_id, conv)

    def delivered(self, conv: Conversation, worker: Worker) -> None:
        """worker's call is over: what it sent is final."""
        if conv.turn is worker:
            conv.delivery.final = True
            self._settle(conv, worker)

    def _settle(self, conv: Conversation, worker: Worker) -> None:
        """Once both the turn's worker and its call are done: the Session keeps what was sent,
        and the conversation is free for its next turn (or closed, if it is not open)."""
        if conv.turn is not worker or not conv.delivery.final or \
                not (worker.ended or worker.done.done()):
            return
        self._starting.discard(conv)
        opened = self._open.get(conv.session.conversation_id) is conv
        if opened:
            try:
                conv.delivery.apply(conv.session)
            except Exception:  # noqa: BLE001 - the conversation stays usable
                log.exception("recording what was sent of a turn failed")
        conv.turn = conv.delivery = None
        conv.last_used = time.monotonic()
        conv.idle.set()
        if not opened:
            self._close(conv)

    def _expired(self, conv: Conversation) -> bool:
        return self.ttl is not None and time.monotonic() - conv.last_used > self.ttl

    async def forget(self, conversation_id: str) -> None:
        """Close the conversation (its Session frees its cache), if open."""
        conv = self._open.pop(conversation_id, None)
        if conv is not None:
            await asyncio.to_thread(self._end, conv)

    # -- Generate conversations ---------------------------------------------------------------

    def generate_started(self) -> None:
        """A Generate call starts: it holds a place until generate_ended."""
        self.make_room()
        self._generating += 1

    def generate_ended(self, conversation_id: str | None, owner: str) -> None:
        """A Generate call ended; conversation_id: the engine conversation it ran in (None if
        the client never learned it), which owner may now end."""
        self._generating -= 1
        if conversation_id:
            owners, _ = self.generated.pop(conversation_id, (set(), 0.0))
            self.generated[conversation_id] = (owners | {owner}, time.monotonic())
            while len(self.generated) > MAX_GENERATED:   # the oldest record goes (not its
                self.generated.popitem(last=False)       # conversation: the engine expires it)

    async def end(self, conversation_id: str, owner: str) -> None:
        """End owner's conversation (Chat or Generate); NOT_FOUND if it has none of that id."""
        conv = self._open.get(conversation_id)
        if conv is not None and conv.owner == owner:
            await self.forget(conversation_id)
        elif owner in self.generated.get(conversation_id, ((), 0.0))[0]:
            del self.generated[conversation_id]
            if not await asyncio.to_thread(self.engine.end_conversation, conversation_id):
                raise not_found(conversation_id)
        elif conv is not None or owner or \
                not await asyncio.to_thread(self.engine.end_conversation, conversation_id):
            raise not_found(conversation_id)    # without API keys: any engine conversation

    # -- expiry -------------------------------------------------------------------------------

    async def expire_loop(self) -> None:
        """Forget conversations idle for longer than ttl (runs until cancelled)."""
        period = min(max(self.ttl / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - self.ttl
            for cid in [c for c, (_, used) in self.generated.items() if used < cutoff]:
                del self.generated[cid]             # the engine expires its own
            for cid, conv in list(self._open.items()):
                if conv.turn is None and self._expired(conv):
                    try:
                        await self.forget(cid)
                    except Exception:  # keep expiring the others
                        log.exception("ending expired conversation %s failed", clip(cid))
