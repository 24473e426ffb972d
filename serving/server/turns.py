"""Chat and Generate turns as streams of response messages. Each turn runs on a worker thread;
a Chat turn on its conversation's Session. A call that is cancelled, disconnects or passes its
deadline cancels its turn in the engine at once; the conversation keeps what the client was
sent (conversations.Delivery).

Every request is checked before any expensive work (INVALID_ARGUMENT naming the field): the
sampling values (SamplingParams, then against the model), the messages (roles, and their count
and size against max_model_len, before anything is tokenized), token ids, cache_salt."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Callable

from pensieve_jax.engine.request import Usage, check_sampling
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.session import Session, TurnStream, check_messages, check_size
from serving.auth import scoped_salt
from serving.errors import clip
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.protocol import messages_from_proto, sampling_from_proto, usage_to_proto
from serving.server.conversations import Conversation, ConversationTable, Delivery
from serving.server.warm_up import WarmUpGate
from serving.server.worker import WorkerPool

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

MAX_SALT_CHARS = 1024


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

    # -- checks -------------------------------------------------------------------------------

    def _params(self, msg: pb.SamplingParams) -> SamplingParams:
        params = sampling_from_proto(msg)
        check_sampling(params, self.engine.model.config.vocab_size, self.engine.max_model_len,
                       explicit_max_tokens=msg.HasField("max_tokens"))
        return params

    def _messages(self, protos, field: str = "messages") -> list[dict[str, str]]:
        if len(protos) >= self.engine.max_model_len:       # before converting them
            raise ValueError(f"{field}: {len(protos)} messages cannot fit max_model_len "
                             f"{self.engine.max_model_len}")
        messages = check_messages(messages_from_proto(protos))
        check_size(self.engine, messages, field)
        return messages

    def _ids(self, ids, field: str) -> None:
        if len(ids) >= self.engine.max_model_len:
            raise ValueError(f"{field} has {len(ids)} tokens; max_model_len is "
                             f"{self.engine.max_model_len}")

    @staticmethod
    def _salt(salt: str) -> None:
        if len(salt) > MAX_SALT_CHARS:
            raise ValueError(f"cache_salt: at most {MAX_SALT_CHARS} characters, got {len(salt)}")

    # -- Chat ---------------------------------------------------------------------------------

    async def _conversation(self, request: pb.ChatRequest, messages: list[dict[str, str]],
                            owner: str) -> tuple[Conversation, list]:
        """owner's conversation a Chat request continues (or a new one) and its turn's
        messages."""
        if request.conversation_id:
            conv = await self.conversations.acquire(request.conversation_id, owner)
            if request.cache_salt and (scoped_salt(owner, request.cache_salt)
                                       != (conv.session.cache_salt or "")):
                raise ValueError(
                    f"cache_salt does not match conversation {clip(request.conversation_id)}: a "
                    "conversation keeps the cache_salt it began with; send that salt, or none, "
                    "with its turns")
            turn_messages = messages
        else:        # a new conversation: its history, then the turn (the last message)
            self.conversations.make_room()
            conv = Conversation(Session(self.engine, history=messages[:-1], cache_salt=(
                scoped_salt(owner, request.cache_salt) or None)), owner)
            turn_messages = messages[-1:]
        if request.history_token_ids:
            turn_messages = seed_history(conv.session, turn_messages,
                                         list(request.history_token_ids),
                                         continuing=bool(request.conversation_id))
        return conv, turn_messages

    async def chat(self, request: pb.ChatRequest, owner: str = ""
                   ) -> AsyncIterator[pb.ChatResponse]:
        params = self._params(request.sampling)
        self._salt(request.cache_salt)
        if not request.messages:
            raise ValueError("no messages: send the new turn's messages (with a conversation_id) "
                             "or the whole history (without one)")
        messages = self._messages(request.messages)
        self._ids(request.history_token_ids, "history_token_ids")
        await self.warm_up.wait()
        conv, turn_messages = await self._conversation(request, messages, owner)
        session, cid = conv.session, conv.session.conversation_id
        sent = Delivery(session.turns)
        worker = self.workers.start(lambda: session.stream_chunks(turn_messages, params),
                                    session.cancel)
        self.conversations.begin(conv, worker, sent)
        try:
            async for chunk in worker:
                if not sent.accepted:     # the engine took the turn: the conversation exists
                    yield pb.ChatResponse(conversation_id=cid)
                    sent.accepted = True
                    self.conversations.accept(conv)
                elif chunk.text or chunk.token_ids:
                    yield pb.ChatResponse(conversation_id=cid, text=chunk.text,
                                          token_ids=chunk.token_ids)
                    sent.sent(chunk.text, chunk.token_ids)
            reply = session.last_reply
        finally:
            if not worker.ended:   # cancelled, disconnected or past its deadline
                worker.cancel()
            # the session keeps what was sent; it is free before the last message goes out
            self.conversations.delivered(conv, worker)
        if self.conversations.kept is not None:    # --state-dir: on disk before it is
            await asyncio.to_thread(self.conversations.kept.save, conv)     # acknowledged
        self.observe(reply.usage)
        yield pb.ChatResponse(conversation_id=cid, finish_reason=reply.finish_reason,
                              usage=usage_to_proto(reply.usage))

    # -- Generate -----------------------------------------------------------------------------

    def _prompt(self, request: pb.GenerateRequest) -> Callable[[], list[int]]:
        """The checked prompt of a Generate request, as a function that tokenizes it (run on
        the worker thread)."""
        which = request.WhichOneof("prompt")
        tok = self.engine.tokenizer
        if which == "text":
            self.engine.check_text(len(request.text.encode("utf-8")), "text")
            return lambda: tok.encode(request.text, add_special_tokens=True)
        if which == "token_ids":
            self._ids(request.token_ids.ids, "token_ids")
            return lambda: list(request.token_ids.ids)
        if which == "messages":
            messages = self._messages(request.messages.messages)
            if not messages:
                raise ValueError("messages is empty")
            if messages[-1]["role"] not in ("user", "tool"):
                raise ValueError("messages must end with a user or tool message")
            return lambda: tok.apply_chat_template(messages)
        raise ValueError("no prompt: set text, token_ids or messages")

    async def generate(self, request: pb.GenerateRequest, owner: str = ""
                       ) -> AsyncIterator[pb.GenerateResponse]:
        """A stateless turn in an anonymous engine conversation (the cached one sharing the
        longest prefix, or a new one), which owner may then end by the id it gets."""
        params = self._params(request.sampling)
        self._salt(request.cache_salt)
        prompt = self._prompt(request)
        await self.warm_up.wait()
        handles = []

        def run():
            ids = prompt()
            handle = self.engine.submit(ids, params,
                                        cache_salt=scoped_salt(owner, request.cache_salt) or None)
            handles.append(handle)
            turn = TurnStream(self.engine, handle, params, ids)
            try:
                yield None                # accepted
                yield from turn
            except GeneratorExit:
                turn.stop()
                raise
            yield (turn.last_chunk(), turn.reply(), turn.output.conversation_id)

        self.conversations.generate_started()
        final = None
        try:
            worker = self.workers.start(run, lambda: handles and handles[0].cancel())
            try:
                async for item in worker:
                    if isinstance(item, tuple):
                        final = item
                    elif item is not None and (item.text or item.token_ids):
                        yield pb.GenerateResponse(text=item.text, token_ids=item.token_ids)
            finally:
                if not worker.ended:
                    worker.cancel()
        finally:
            self.conversations.generate_ended(final and final[2], owner)
        last, reply, cid = final
        self.observe(reply.usage)
        yield pb.GenerateResponse(conversation_id=cid, text=last.text, token_ids=last.token_ids,
                                  finish_reason=reply.finish_reason,
                                  usage=usage_to_proto(reply.usage))
