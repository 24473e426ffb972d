"""The in-process Session API: one conversation, turn by turn, for notebooks and scripts.

    session = engine.session(system="You are terse.")
    reply = session.send("Hi!")                  # Reply(text, token_ids, finish_reason, usage)
    for piece in session.stream("And then?"):     # text pieces as they decode (UTF-8 safe)
        print(piece, end="")
    session.close()                               # frees the conversation's cache

Each turn sends the conversation's exact token sequence so far (prompt and generated tokens of
every earlier turn) plus the chat-template continuation for the new message, so the engine
finds the whole history in its cache and prefills only the new turn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from typing import TYPE_CHECKING, AsyncIterator, Iterator

from pensieve_jax.request import RequestOutput, Usage
from pensieve_jax.sampling import SamplingParams

if TYPE_CHECKING:
    from pensieve_jax.engine import Engine


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage


class SessionClosed(RuntimeError):
    pass


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces. Holds back an incomplete UTF-8
    character, and (when stop strings are set) a tail that could still become one."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, ids) -> str:
        self.ids.extend(ids)
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        upto = max(self.sent, min(hits) if hits else len(text) - self.holdback)
        piece, self.sent = text[self.sent:upto], upto
        return piece

    def finish(self, end: int | None = None) -> str:
        text = self.text()
        end = len(text) if end is None else end
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class Session:
    def __init__(self, engine: "Engine", system: str | None = None):
        self.engine = engine
        self.conversation_id = f"session-{uuid.uuid4().hex[:12]}"
        self.history: list[dict[str, str]] = []
        if system is not None:
            self.history.append({"role": "system", "content": system})
        self.last_reply: Reply | None = None
        self._ids: list[int] = []           # every token the conversation has seen
        self._closed = False
        self._lock = threading.Lock()       # one turn at a time

    def _prompt_ids(self, text: str) -> list[int]:
        tok = self.engine.tokenizer
        rendered = tok.render_chat(self.history + [{"role": "user", "content": text}])
        seen = tok.decode(self._ids)
        if self._ids and rendered.startswith(seen):
            return self._ids + tok.encode(rendered[len(seen):])
        return tok.encode(rendered)         # the template rewrote history: match what we can

    def stream(self, text: str, params: SamplingParams | None = None) -> Iterator[str]:
        if self._closed:
            raise SessionClosed(f"session {self.conversation_id} is closed")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("message text is empty")
        params = params or SamplingParams()
        with self._lock:
            prompt = self._prompt_ids(text)
            handle = self.engine.submit(prompt, params, conversation_id=self.conversation_id)
            detok = IncrementalDetokenizer(self.engine.tokenizer, params.stop)
            output: RequestOutput | None = None
            try:
                for event in handle:
                    if event.output is not None:
                        output = event.output
                        break
                    piece = detok.add(event.token_ids)
                    if piece:
                        yield piece
                piece = detok.finish(output.stop_text_index)
                if piece:
                    yield piece
            finally:
                if output is None:          # the caller stopped early: cancel, keep what ran
                    handle.cancel()
                    output = handle.result()
                self._record(text, detok, output)

    def _record(self, text: str, detok: IncrementalDetokenizer, output: RequestOutput) -> None:
        reply_text = detok.text()[:output.stop_text_index]
        self.history += [{"role": "user", "content": text},
                         {"role": "assistant", "content": reply_text}]
        self._ids = list(output.prompt_token_ids) + list(output.token_ids)
        self.last_reply = Reply(reply_text, tuple(self.engine.strip_stop(output)),
                                output.finish_reason, output.usage)

    def send(self, text: str, params: SamplingParams | None = None) -> Reply:
        for _ in self.stream(text, params):
            pass
        return self.last_reply

    async def asend(self, text: str, params: SamplingParams | None = None) -> Reply:
        return await asyncio.to_thread(self.send, text, params)

    async def astream(self, text: str, params: SamplingParams | None = None) -> AsyncIterator[str]:
        pieces = self.stream(text, params)
        sentinel = object()
        while (piece := await asyncio.to_thread(next, pieces, sentinel)) is not sentinel:
            yield piece

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.end_conversation(self.conversation_id)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
