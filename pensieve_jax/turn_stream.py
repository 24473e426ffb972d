"""A submitted turn read as it streams: the text pieces and token ids (Chunk) of a RequestHandle,
decoded once and UTF-8 safe, holding back what could still become a stop string
(IncrementalDetokenizer); the turn's Reply at its end, or after it was stopped or failed."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterator, Sequence

from pensieve_jax.engine.request import RequestHandle, RequestOutput, Usage
from pensieve_jax.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine


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

    def __init__(self, engine: "Engine", handle: RequestHandle, params: SamplingParams,
                 prompt: Sequence[int] = ()):
        self.engine = engine
        self.handle = handle
        self.prompt = tuple(prompt)          # what was submitted (for a failed turn's output)
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
            try:
                self.output = self.handle.result()
            except Exception:  # noqa: BLE001 - it failed meanwhile: keep what was read
                self.abandon()

    def abandon(self) -> None:
        """The engine failed the turn: its output is the tokens read so far ("abort")."""
        if self.output is None:
            ids, n = tuple(self.detok.ids), len(self.prompt)
            self.output = RequestOutput(self.handle.request_id, self.handle.conversation_id or "",
                                        self.prompt, ids, "abort", None,
                                        Usage(n, 0, n, 0, len(ids), 0.0, 0.0))

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
