"""Chat and Generate turns as streams of response messages. Each turn runs on a worker thread;
a Chat turn on its conversation's Session. A call that is cancelled, disconnects or passes its
deadline cancels its turn in the engine at once; the conversation keeps what was generated."""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator, Callable

from pensieve_jax.engine.request import Usage
from pensieve_jax.session import Session, TurnStream
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.protocol import messages_from_proto, sampling_from_proto, usage_to_proto
from serving.server.conversations import Conversation, ConversationTable
from serving.server.warm_up import WarmUpGate
from serving.server.worker import WorkerPool

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine


def seed_history(session: Session, messages: list[dict[str, str]], ids: list[int],
                 continuing: bool) -> list[dict[str, str]]:
    """ChatRequest.history_token_ids: the session continues from exactly `ids` (a router moved
    the conversation here). When continuing, all messages but the last join the history first.
    Returns the turn's messages."""
    vocab = session.engine.model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"history_token_ids out of range [0, {vocab}): {bad[:5]}")
    if continuing:
        session.continue_from(ids, earlier=messages[:-1])
        return messages[-1:]
    session.continue_from(ids)
    return messages


class Turns:
    """Runs the turns of Chat and Generate calls, after the warm-up, on the pool's workers;
    observe(usage) hears of each finished turn."""

    def __init__(self, engine: "Engine", conversations: ConversationTable, workers: WorkerPool,
                 warm_up: WarmUpGate, observe: Callable[[Usage], None]):
        self.engine = engine
        self.conversations = conversations
        self.workers = workers
        self.warm_up = warm_up
        self.observe = observe

    async def _conversation(self, request: pb.ChatRequest,
                            messages: list[dict[str, str]]) -> tuple[Conversation, list]:
        """The conversation a Chat request continues (or a new one) and its turn's messages."""
        if request.conversation_id:
            conv = await self.conversations.acquire(request.conversation_id)
            if request.cache_salt and request.cache_salt != (conv.session.cache_salt or ""):
                raise ValueError(
                    f"cache_salt does not match conversation {request.conversation_id!r}: a "
                    "conversation keeps the cache_salt it began with; send that salt, or none, "
                    "with its turns")
            turn_messages = messages
        else:        # a new conversation: its history, then the turn (the last message)
            conv = Conversation(Session(self.engine, history=messages[:-1],
                                        cache_salt=request.cache_salt or None))
            turn_messages = messages[-1:]
        if request.history_token_ids:
            turn_messages = seed_history(conv.session, turn_messages,
                                         list(request.history_token_ids),
                                         continuing=bool(request.conversation_id))
        return conv, turn_messages

    async def chat(self, request: pb.ChatRequest) -> AsyncIterator[pb.ChatResponse]:
        params = sampling_from_proto(request.sampling)
        messages = messages_from_proto(request.messages)
        if not messages:
            raise ValueError("no messages: send the new turn's messages (with a conversation_id) "
                             "or the whole history (without one)")
        await self.warm_up.wait()
        conv, turn_messages = await self._conversation(request, messages)
        session, cid = conv.session, conv.session.conversation_id
        worker = self.workers.start(lambda: session.stream_chunks(turn_messages, params),
                                    session.cancel)
        self.conversations.begin(conv, worker)
        accepted = False
        try:
            async for chunk in worker:
                if not accepted:          # the engine took the turn: the conversation exists
                    accepted = True
                    self.conversations.accept(conv)
                    yield pb.ChatResponse(conversation_id=cid)
                elif chunk.text or chunk.token_ids:
                    yield pb.ChatResponse(conversation_id=cid, text=chunk.text,
                                          token_ids=chunk.token_ids)
        finally:
            if worker.ended:   # the session is free: say so before the last message goes out
                self.conversations.turn_ended(conv, worker)
            else:              # cancelled, disconnected or past its deadline
                worker.cancel()
        reply = session.last_reply
        self.observe(reply.usage)
        yield pb.ChatResponse(conversation_id=cid, finish_reason=reply.finish_reason,
                              usage=usage_to_proto(reply.usage))

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        params = sampling_from_proto(request.sampling)
        which = request.WhichOneof("prompt")
        if which is None:
            raise ValueError("no prompt: set text or token_ids")
        await self.warm_up.wait()
        handles = []

        def run():
            if which == "text":
                ids = self.engine.tokenizer.encode(request.text, add_special_tokens=True)
            else:
                ids = list(request.token_ids.ids)
            handle = self.engine.submit(ids, params, cache_salt=request.cache_salt or None)
            handles.append(handle)
            turn = TurnStream(self.engine, handle, params)
            try:
                yield None                # accepted
                yield from turn
            except GeneratorExit:
                turn.stop()
                raise
            yield (turn.last_chunk(), turn.reply(), turn.output.conversation_id)

        worker = self.workers.start(run, lambda: handles and handles[0].cancel())
        final = None
        try:
            async for item in worker:
                if isinstance(item, tuple):
                    final = item
                elif item is not None and (item.text or item.token_ids):
                    yield pb.GenerateResponse(text=item.text, token_ids=item.token_ids)
        finally:
            if not worker.ended:
                worker.cancel()
        last, reply, cid = final
        self.observe(reply.usage)
        yield pb.GenerateResponse(conversation_id=cid, text=last.text, token_ids=last.token_ids,
                                  finish_reason=reply.finish_reason,
                                  usage=usage_to_proto(reply.usage))
