"""The in-process Session API: one conversation, turn by turn, for notebooks and scripts.

    session = engine.session(system="You are terse.")
    reply = session.send("Hi!")                  # Reply(text, token_ids, finish_reason, usage)
    for piece in session.stream("And then?"):     # text pieces as they decode (UTF-8 safe)
        print(piece, end="")
    session.close()                               # frees the conversation's cache

Each turn sends the conversation's exact token sequence so far (prompt and generated tokens of
every earlier turn) plus the chat-template continuation for the new message, so the engine
finds the whole history in its cache and prefills only the new turn.

A session may start from an earlier history (`engine.session(history=[...])`, messages with a
role and content), or continue from given token ids (`session.continue_from(ids)`); a turn may
also be a list of messages ending with the user's.
`stream_chunks` gives the text pieces together with their token ids, and `cancel()` (from any
thread) stops the running turn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from typing import TYPE_CHECKING, AsyncIterator, Iterable, Iterator, Sequence

from pensieve_jax.engine.errors import EngineClosed
from pensieve_jax.engine.request import RequestHandle, RequestOutput, Usage
from pensieve_jax.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of a streamed turn: new text (possibly empty while a partial character or a
    possible stop string is held back) and new generated token ids (a final stop token is left
    out, as in Reply.token_ids)."""
    text: str
    token_ids: tuple[int, ...]


class SessionClosed(RuntimeError):
    pass


def check_messages(messages: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """Copies of chat messages ({"role", "content"}), or a ValueError naming the bad one."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def turn_messages(text: str | Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """A turn's messages: a user's text, or messages that end with the user's; or ValueError."""
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else \
        check_messages(text)
    if not messages:
        raise ValueError("the turn has no messages")
    if messages[-1]["role"] != "user":
        raise ValueError(f"a turn must end with a user message, not {messages[-1]['role']!r}")
    if not isinstance(messages[-1]["content"], str) or not messages[-1]["content"].strip():
        raise ValueError("message text is empty")
    return messages


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces. Holds back an incomplete UTF-8
    character, and (when stop strings are set) a tail that could still become one. Each id is
    decoded once: by the engine (its TokenEvent.text, passed to `add`), else here
    (Tokenizer.text_stream)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.ids: list[int] = []
        self.sent = 0
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self._stream = tokenizer.text_stream()
        self._text = ""

    def text(self) -> str:
        return self._text

    def add(self, ids, text: str | None = None) -> str:
        """The next ids and their text (None: decoded here); returns the piece to show now."""
        self.ids.extend(ids)
        self._text += text if text is not None else "".join(self._stream.step(i) for i in ids)
        text = self._text
        hits = [i for i in (text.find(s, max(0, self.sent - self.holdback)) for s in self.stop)
                if i >= 0]
        upto = max(self.sent, min(hits) if hits else len(text) - self.holdback)
        piece, self.sent = text[self.sent:upto], upto
        return piece

    def finish(self, end: int | None = None) -> str:
        text = self._text
        end = len(text) if end is None else end
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class TurnStream:
    """Reads one submitted turn's RequestHandle as Chunks. Iterating yields every chunk but the
    last; once the engine's output arrived (`output`), `last_chunk()` and `reply()` finish it.
    `stop()` cancels a turn still running; the reply then keeps the tokens read so far."""

    def __init__(self, engine: "Engine", handle: RequestHandle, params: SamplingParams):
        self.engine = engine
        self.handle = handle
        self.detok = IncrementalDetokenizer(engine.tokenizer, params.stop)
        self.output: RequestOutput | None = None
        self._held: tuple[int, ...] = ()     # the newest ids: they may be a final stop token
        self._sent = 0                       # token ids handed out

    def __iter__(self) -> Iterator[Chunk]:
        for event in self.handle:
            if event.output is not None:
                self.output = event.output
                return
            piece = self.detok.add(event.token_ids, event.text)
            ids, self._held = self._held, tuple(event.token_ids)
            self._sent += len(ids)
            if piece or ids:
                yield Chunk(piece, ids)

    def stop(self) -> None:
        if self.output is None:
            self.handle.cancel()
            self.output = self.handle.result()

    def _ids(self) -> list[int]:
        """Generated ids read from the engine (without a final stop token)."""
        return self.engine.strip_stop(self.output)[:len(self.detok.ids)]

    def last_chunk(self) -> Chunk:
        return Chunk(self.detok.finish(self.output.stop_text_index), tuple(self._ids()[self._sent:]))

    def reply(self) -> Reply:
        out = self.output
        complete = len(self.detok.ids) == len(out.token_ids)
        return Reply(self.detok.text()[:out.stop_text_index], tuple(self._ids()),
                     out.finish_reason if complete else "abort", out.usage)


class TurnMethods:
    """send / stream / asend / astream and `with` for a conversation that implements
    stream_chunks(text, params), last_reply and close() (Session, serving's RemoteSession)."""

    def stream(self, text: str | Sequence[dict[str, str]],
               params: SamplingParams | None = None) -> Iterator[str]:
        chunks = self.stream_chunks(text, params)
        try:
            for chunk in chunks:
                if chunk.text:
                    yield chunk.text
        finally:
            chunks.close()

    def send(self, text: str | Sequence[dict[str, str]],
             params: SamplingParams | None = None) -> Reply:
        for _ in self.stream_chunks(text, params):
            pass
        return self.last_reply

    async def asend(self, text: str, params: SamplingParams | None = None) -> Reply:
        return await asyncio.to_thread(self.send, text, params)

    async def astream(self, text: str, params: SamplingParams | None = None) -> AsyncIterator[str]:
        pieces = self.stream(text, params)
        sentinel = object()
        while (piece := await asyncio.to_thread(next, pieces, sentinel)) is not sentinel:
            yield piece

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Session(TurnMethods):
    def __init__(self, engine: "Engine", system: str | None = None,
                 history: Iterable[dict[str, str]] | None = None, cache_salt: str | None = None):
        self.engine = engine
        self.cache_salt = cache_salt        # shares cached pages only with the same salt
        self.conversation_id = f"session-{uuid.uuid4().hex[:12]}"
        self.history: list[dict[str, str]] = []
        if system is not None:
            self.history.append({"role": "system", "content": system})
        self.history += check_messages(history or ())
        # what the chat template renders: replies as their tokens decode with special tokens
        # kept, so that the rendered text extends the conversation's token history exactly
        self._template_history = list(self.history)
        self.last_reply: Reply | None = None
        self._ids: list[int] = []           # every token the conversation has seen
        self._closed = False
        self._lock = threading.Lock()       # one turn at a time
        self._turn: TurnStream | None = None

    def continue_from(self, token_ids: Sequence[int],
                      earlier: Iterable[dict[str, str]] = ()) -> None:
        """Continue the conversation from exactly `token_ids`: its whole token history so far
        (prompts and replies of every earlier turn), e.g. as a router held it when it moved the
        conversation to this engine. `earlier` messages (checked like `history`) first join the
        history. The next turn's prompt extends these ids where the chat template's rendering
        of the history starts with them. Call it between turns."""
        earlier = check_messages(earlier)
        self.history += earlier
        self._template_history += earlier
        self._ids = list(token_ids)

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.engine.tokenizer
        rendered = tok.render_chat(self._template_history + messages)
        seen = tok.decode(self._ids)
        if self._ids and rendered.startswith(seen):
            return self._ids + tok.encode(rendered[len(seen):])
        return tok.encode(rendered)         # the template rewrote history: match what we can

    def stream_chunks(self, text: str | Sequence[dict[str, str]],
                      params: SamplingParams | None = None) -> Iterator[Chunk]:
        """One turn as Chunks. text: the user's message, or the turn's messages ending with the
        user's. The first chunk is empty and comes once the engine accepted the turn (errors
        in the input or EngineOverloaded are raised before it). Closing the iterator early
        cancels the turn; the conversation keeps the tokens read so far."""
        if self._closed:
            raise SessionClosed(f"session {self.conversation_id} is closed")
        messages = turn_messages(text)
        params = params or SamplingParams()
        with self._lock:
            prompt = self._prompt_ids(messages)
            handle = self.engine.submit(prompt, params, conversation_id=self.conversation_id,
                                        cache_salt=self.cache_salt)
            turn = self._turn = TurnStream(self.engine, handle, params)
            try:
                yield Chunk("", ())
                yield from turn
            except GeneratorExit:           # the caller stopped early: cancel, keep what ran
                turn.stop()
                self._record(messages, turn)
                raise
            finally:
                self._turn = None
            last = turn.last_chunk()
            self._record(messages, turn)
            if last.text or last.token_ids:
                yield last

    def _record(self, messages: list[dict[str, str]], turn: TurnStream) -> None:
        reply = turn.reply()
        self.history += messages + [{"role": "assistant", "content": reply.text}]
        raw = reply.text if turn.output.stop_text_index is not None else \
            self.engine.tokenizer.decode(reply.token_ids)
        self._template_history += messages + [{"role": "assistant", "content": raw}]
        self._ids = list(turn.output.prompt_token_ids) + turn.detok.ids
        self.last_reply = reply

    def cancel(self) -> None:
        """Stop the running turn, if any (from any thread); its stream ends with finish_reason
        "abort" and the conversation keeps what was generated."""
        turn = self._turn
        if turn is not None:
            turn.handle.cancel()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.engine.end_conversation(self.conversation_id)
            except EngineClosed:      # its cache went with the engine
                pass
