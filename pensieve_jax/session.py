"""The in-process Session API: one conversation, turn by turn, for notebooks and scripts.

    session = engine.session(system="You are terse.")
    reply = session.send("Hi!")                  # Reply(text, token_ids, finish_reason, usage)
    for piece in session.stream("And then?"):     # text pieces as they decode (UTF-8 safe)
        print(piece, end="")
    session.close()                               # frees the conversation's cache

Each turn sends the conversation's exact token history (prompt and generated tokens of every
earlier turn) plus the chat-template continuation for the new message, so the engine finds it
in its cache and prefills only the new turn. That history is the engine's, the process's one
copy (Engine.history: token_ids, rewind), kept while the Session is open.

A session may start from an earlier history (`engine.session(history=[...])`, messages with a
role and content), or continue from given token ids (`session.continue_from(ids)`); a turn may
also be a list of messages ending with the user's. `stream_chunks` gives the text pieces
together with their token ids, and `cancel()` (from any thread) stops the running turn. A turn
that is stopped early or fails keeps what was read; `truncate_reply(n)` cuts it to what its
caller was actually shown (a server's delivered chunks), `undo_turn()` forgets it. Messages
that cannot fit max_model_len are refused before anything is tokenized (`check_size`).

A session named by `conversation_id` on an engine with a state_dir is kept across restarts
(engine/kept_sessions.py): its record is written before each turn's last chunk (or reply) is
returned, a later process's `engine.session(conversation_id=...)` continues it, close() ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import threading
from typing import TYPE_CHECKING, AsyncIterator, Iterable, Iterator, Sequence

from pensieve_jax.engine.errors import EngineClosed, brief
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.turn_stream import Chunk, IncrementalDetokenizer, Reply, TurnStream

__all__ = ["Chunk", "IncrementalDetokenizer", "Reply", "ROLES", "Session", "SessionClosed",
           "TurnMethods", "TurnStream", "check_messages", "check_size", "turn_messages"]

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

ROLES = ("system", "user", "assistant", "tool")


class SessionClosed(RuntimeError):
    pass


def check_messages(messages: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """Copies of chat messages ({"role", "content"}), or a ValueError naming the bad one."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got "
                             f"{brief(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {brief(role)} (known: "
                             f"{', '.join(ROLES)})")
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
        raise ValueError(f"a turn must end with a user message, not {brief(messages[-1]['role'])}")
    if not isinstance(messages[-1]["content"], str) or not messages[-1]["content"].strip():
        raise ValueError("message text is empty")
    return messages


def check_size(engine: "Engine", messages: Sequence[dict[str, str]], field: str = "messages"
               ) -> None:
    """ValueError naming field if messages cannot fit the engine's max_model_len: more of them
    than tokens, or more text than the longest prompt holds. Nothing is tokenized."""
    if len(messages) >= engine.max_model_len:
        raise ValueError(f"{field}: {len(messages)} messages cannot fit max_model_len "
                         f"{engine.max_model_len}")
    engine.check_text(sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages),
                      field)


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
                 history: Iterable[dict[str, str]] | None = None, cache_salt: str | None = None,
                 conversation_id: str | None = None):
        if conversation_id is not None and (not isinstance(conversation_id, str) or
                                            not conversation_id.strip()):
            raise ValueError(f"conversation_id must be a non-empty string, got "
                             f"{brief(conversation_id)}")
        self.engine = engine
        self.cache_salt = cache_salt        # shares cached pages only with the same salt
        self.conversation_id = conversation_id or f"session-{secrets.token_hex(16)}"  # 128 bits
        self.history: list[dict[str, str]] = []
        if system is not None:
            self.history.append({"role": "system", "content": system})
        self.history += check_messages(history or ())
        check_size(engine, self.history, "history")
        # what the chat template renders: replies as their tokens decode with special tokens
        # kept, so that the rendered text extends the conversation's token history exactly
        self._template_history = list(self.history)
        self.last_reply: Reply | None = None
        self._closed, self._lock = False, threading.Lock()   # the lock: one turn at a time
        self._turn: TurnStream | None = None
        self.turns = 0                      # turns recorded (undo_turn takes one back)
        self._undo: tuple | None = None     # the state before the last turn was recorded
        engine.history.hold_while(self, self.conversation_id)   # a dropped Session lets go
        # named, on an engine with a state_dir: kept there (a kept one is continued)
        self.kept = getattr(engine, "kept", None) if conversation_id is not None else None
        if self.kept is not None:
            self.kept.attach(self, started=bool(self.history))

    @property
    def token_ids(self) -> list[int]:
        """The conversation's whole token history, exactly: the engine's ([] once closed)."""
        return [] if self._closed else self.engine.history.token_ids(self.conversation_id)

    @property
    def template_history(self) -> list[dict[str, str]]:
        """The messages the chat template renders (replies as their tokens decode)."""
        return list(self._template_history)

    def continue_from(self, token_ids: Sequence[int],
                      earlier: Iterable[dict[str, str]] = ()) -> None:
        """Continue the conversation from exactly `token_ids`: its whole token history so far
        (prompts and replies of every earlier turn), e.g. as a router held it when it moved the
        conversation here. `earlier` messages (checked like `history`) first join the history.
        The next turn's prompt extends these ids where the chat template's rendering of the
        history starts with them. Between turns; undo_turn cannot go back past it."""
        earlier = check_messages(earlier)
        check_size(self.engine, earlier, "history")
        with self._lock:
            self._rewind(token_ids)
            self.history += earlier
            self._template_history += earlier
            self._undo = None

    def _prompt_ids(self, messages: list[dict[str, str]]) -> tuple[list[int], tuple]:
        """The engine's history extended by the new turn's rendering (content as plain text: a
        user cannot forge control tokens), or the whole rendering where the template rewrote
        the history; and how undo_turn rewinds: ((), its length), or if rewritten (ids, None)."""
        before = self.engine.history.token_ids(self.conversation_id, hold=True)
        prompt = self.engine.tokenizer.encode_chat(self._template_history + messages,
                                                   prefix_ids=before)
        return prompt, ((), len(before)) if prompt[:len(before)] == before else (before, None)

    def stream_chunks(self, text: str | Sequence[dict[str, str]],
                      params: SamplingParams | None = None) -> Iterator[Chunk]:
        """One turn as Chunks. text: the user's message, or the turn's messages ending with the
        user's. The first chunk is empty and comes once the engine accepted the turn (bad input
        or EngineOverloaded raise before it). Closing it early cancels; what was read is kept."""
        if self._closed:
            raise SessionClosed(f"session {self.conversation_id} is closed")
        messages = turn_messages(text)
        check_size(self.engine, messages)
        params = params or SamplingParams()
        with self._lock:
            prompt, before = self._prompt_ids(messages)
            handle = self.engine.submit(prompt, params, conversation_id=self.conversation_id,
                                        cache_salt=self.cache_salt)
            turn = self._turn = TurnStream(self.engine, handle, params, prompt)
            try:
                yield Chunk("", ())
                yield from turn
            except GeneratorExit:           # the caller stopped early: cancel, keep what ran
                turn.stop()
                raise
            except Exception:               # the engine failed the turn: keep what was read
                turn.abandon()
                raise
            finally:
                self._turn = None
                if turn.output is not None:
                    self._record(messages, turn, before)
            last = turn.last_chunk()
            if last.text or last.token_ids:
                yield last

    def _record(self, messages: list[dict[str, str]], turn: TurnStream, before: tuple) -> None:
        """The turn joins the history (in the engine's: a turn stopped or failed keeps what the
        stream read; else the prompt and every token produced, a stop token's or string's too)."""
        reply = turn.reply()
        if reply.finish_reason == "abort":
            with contextlib.suppress(EngineClosed):      # the history went with the engine
                self._rewind(list(turn.output.prompt_token_ids) + turn.detok.ids)
        self._undo = (len(self.history), len(self._template_history), before, self.last_reply)
        self.turns += 1
        self.history += messages + [{"role": "assistant", "content": reply.text}]
        raw = reply.text if turn.output.stop_text_index is not None else \
            self.engine.tokenizer.decode(reply.token_ids)
        self._template_history += messages + [{"role": "assistant", "content": raw}]
        self.last_reply = reply
        self._keep()

    def _rewind(self, token_ids: Sequence[int] = (), keep: int | None = None) -> None:
        """The engine's history becomes token_ids (or its first keep), before the next turn."""
        self.engine.history.rewind(self.conversation_id, token_ids, self.cache_salt, keep,
                                   wait=False)

    def _keep(self) -> None:
        """A kept session's record: durable before the turn's last chunk goes out."""
        if self.kept is not None:
            self.kept.save(self)

    def truncate_reply(self, n_tokens: int, text: str | None = None) -> None:
        """Keep of the last turn's reply only what its caller was shown (a server, after a turn
        cancelled, failed or past its deadline): its first n_tokens ids and `text` as its text
        (default: those ids' text); the next turn continues from exactly these. Between turns."""
        reply = self.last_reply
        cut = n_tokens < len(reply.token_ids) if reply is not None else False
        if reply is None or not cut and text in (None, reply.text):
            return
        tok = self.engine.tokenizer
        with self._lock:
            ids = reply.token_ids[:max(0, n_tokens)]
            if cut:             # the engine's history: the turn's prompt, then these ids
                self._rewind(keep=reply.usage.prompt_tokens + len(ids))
                self._template_history[-1] = {"role": "assistant", "content": tok.decode(ids)}
            shown = tok.decode(ids, skip_special_tokens=True) if text is None else text
            self.history[-1] = {"role": "assistant", "content": shown}
            self.last_reply = dataclasses.replace(
                reply, text=shown, token_ids=ids,
                finish_reason="abort" if cut else reply.finish_reason)
            self._keep()

    def undo_turn(self) -> None:
        """Forget the last turn recorded (its caller never learned that it was accepted); the
        engine reuses only the part of its cache that matches the next turn. Between turns."""
        with self._lock:
            if self._undo is None:
                return
            n_history, n_template, (ids, keep), last_reply = self._undo
            self._rewind(ids, keep)
            self.last_reply = last_reply
            del self.history[n_history:], self._template_history[n_template:]
            self._undo = None
            self.turns -= 1
            self._keep()

    def cancel(self) -> None:
        """Stop the running turn, if any (from any thread): it ends "abort", keeping its tokens."""
        turn = self._turn
        if turn is not None:
            turn.handle.cancel()

    def close(self) -> None:
        """End the conversation: its cache is freed (and a kept one's record deleted)."""
        if not self._closed:
            self._closed = True
            if self.kept is not None:
                self.kept.forget(self.conversation_id)
            with contextlib.suppress(EngineClosed):      # its cache went with the engine
                self.engine.end_conversation(self.conversation_id)
