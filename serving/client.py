"""Client library: the in-process Session API, over gRPC.

    from serving.client import connect
    chat = connect("127.0.0.1:50051").session(system="Be brief.")   # or engine.session(...)
    reply = chat.send("Hi!", SamplingParams(max_tokens=64))          # the same Reply type
    for piece in chat.stream("And then?"):
        print(piece, end="")
    chat.close()                                                     # frees its cache

Errors arrive as exceptions that are both `serving.errors.RemoteError` (with the status code) and
what the in-process API raises for the same problem (ValueError, EngineOverloaded, ...).

A server with API keys and TLS (`pensieve serve --api-key KEY --tls-cert ... --tls-key ...`):

    connect("host:50051", api_key="KEY", tls_ca="ca.pem")     # tls_ca: a path or PEM bytes

Every call then carries metadata "authorization: Bearer KEY" (send a key over TLS only, but to
a server on loopback); a wrong or missing one fails UnauthenticatedError (UNAUTHENTICATED).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, Iterable, Iterator, Sequence

import grpc

from pensieve_jax.engine.request import Usage
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.session import (Chunk, Reply, SessionClosed, TurnMethods, check_messages,
                                  turn_messages)
from serving.auth import bearer_metadata
from serving.errors import NotFound, from_rpc_error
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.protocol import messages_to_proto, sampling_to_proto, usage_from_proto
from serving.tls import Pem, channel_credentials


@dataclasses.dataclass(frozen=True)
class Generation(Reply):
    """What Client.generate returns: a Reply plus the engine conversation that ran it."""
    conversation_id: str = ""


# UNAVAILABLE (a server not listening yet or going away, a router with no healthy replica) is
# retried by gRPC itself: up to 3 attempts, 0.2-2 s apart, within the call's deadline. gRPC
# retries only a call that has received no response yet; a Chat call's first response says the
# server accepted the turn, so no conversation runs a turn twice (Generate keeps no state).
RETRY_POLICY = {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "2s",
                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
SERVICE_CONFIG = json.dumps({"methodConfig": [
    {"name": [{"service": pb.DESCRIPTOR.services_by_name["Pensieve"].full_name}],
     "retryPolicy": RETRY_POLICY}]})


def _partial_usage(n: int) -> Usage:
    return Usage(0, 0, 0, 0, n, 0.0, 0.0)


class _Forgotten(Exception):
    """The server no longer knows a conversation that RemoteSession(resume=True) may resume."""


class Client:
    """A connection to a Pensieve server. timeout: a deadline (seconds) for every call.
    options: gRPC channel options; a "grpc.service_config" among them replaces SERVICE_CONFIG
    (its retry policy). api_key: sent with every call (authorization: Bearer KEY). tls_ca: TLS,
    trusting this CA or self-signed certificate (a PEM path or bytes); None: plaintext."""

    def __init__(self, target: str, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] | None = None, api_key: str | None = None,
                 tls_ca: Pem | None = None):
        self.target = target
        self.timeout = timeout
        self.metadata = bearer_metadata(api_key) or None     # every call's
        options = list(options or ())
        if not any(name == "grpc.service_config" for name, _ in options):
            options.append(("grpc.service_config", SERVICE_CONFIG))
        credentials = channel_credentials(tls_ca)
        self.channel = grpc.insecure_channel(target, options=options) if credentials is None \
            else grpc.secure_channel(target, credentials, options=options)
        self.stub = pb_grpc.PensieveStub(self.channel)

    def wait_ready(self, timeout: float = 10.0) -> "Client":
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        return self

    def session(self, system: str | None = None,
                history: Iterable[dict[str, str]] | None = None,
                cache_salt: str | None = None, resume: bool = False) -> "RemoteSession":
        return RemoteSession(self, system, history, cache_salt, resume)

    def generate_stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                        cache_salt: str | None = None) -> Iterator[pb.GenerateResponse]:
        """Raw text or token ids, no chat template: the response messages as they arrive."""
        request = pb.GenerateRequest(sampling=sampling_to_proto(params),
                                     cache_salt=cache_salt or "")
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(int(i) for i in prompt)
        call = self.stub.Generate(request, timeout=self.timeout, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 cache_salt: str | None = None) -> Generation:
        text, ids, last = [], [], None
        for response in self.generate_stream(prompt, params, cache_salt):
            text.append(response.text)
            ids.extend(response.token_ids)
            last = response
        return Generation("".join(text), tuple(ids), last.finish_reason,
                          usage_from_proto(last.usage), last.conversation_id)

    def end_conversation(self, conversation_id: str) -> bool:
        """Free a conversation's cache; False if the server does not know it."""
        try:
            self.stub.EndConversation(pb.EndConversationRequest(conversation_id=conversation_id),
                                      timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            if isinstance(err, NotFound):
                return False
            raise err from None
        return True

    def stats(self) -> dict[str, Any]:
        """The engine's stats() (as the server reports them)."""
        return json.loads(self.stats_response().stats_json)

    def stats_response(self) -> pb.GetStatsResponse:
        try:
            return self.stub.GetStats(pb.GetStatsRequest(), timeout=self.timeout,
                                      metadata=self.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(target: str, timeout: float | None = None, api_key: str | None = None,
            tls_ca: Pem | None = None, **kwargs) -> Client:
    """A Client for a server at host:port (timeout: a deadline in seconds for every call;
    api_key: its API key; tls_ca: connect over TLS trusting this CA, a PEM path or bytes)."""
    return Client(target, timeout, api_key=api_key, tls_ca=tls_ca, **kwargs)


class RemoteSession(TurnMethods):
    """One conversation on a server, with the shape of pensieve_jax.session.Session. The server
    assigns `conversation_id` on the first turn (None before).

    resume: when the server no longer knows the conversation (ended elsewhere, expired, or
    forgotten by a router) and this session has had a reply, send the turn again with the
    whole history as a new conversation (the server recomputes it; `conversation_id` changes)
    instead of raising ConversationNotFound (the default)."""

    def __init__(self, client: Client, system: str | None = None,
                 history: Iterable[dict[str, str]] | None = None, cache_salt: str | None = None,
                 resume: bool = False):
        self.client = client
        self.cache_salt = cache_salt
        self.resume = resume
        self.conversation_id: str | None = None
        self.history: list[dict[str, str]] = []
        if system is not None:
            self.history.append({"role": "system", "content": system})
        self.history += check_messages(history or ())
        self.last_reply: Reply | None = None
        self._closed = False
        self._lock = threading.Lock()        # one turn at a time
        self._call = None
        self._cancelled = False

    def stream_chunks(self, text: str | Sequence[dict[str, str]],
                      params: SamplingParams | None = None) -> Iterator[Chunk]:
        """As Session.stream_chunks: an empty chunk once the server accepted the turn, then the
        reply's chunks. Closing the iterator early cancels the call (and so the turn)."""
        if self._closed:
            raise SessionClosed(f"session {self.conversation_id} is closed")
        messages = turn_messages(text)
        with self._lock:
            yield from self._turn(messages, params)

    def _turn(self, messages, params) -> Iterator[Chunk]:
        # The channel retries UNAVAILABLE (SERVICE_CONFIG). Resuming a forgotten conversation is
        # no retry gRPC can make: the request changes (the whole history, as a new conversation).
        try:
            yield from self._send(messages, params)
        except _Forgotten:
            self.conversation_id = None
            yield from self._send(messages, params)

    def _send(self, messages, params) -> Iterator[Chunk]:
        """One Chat call for the turn; _Forgotten if it should be sent again from the history."""
        request = pb.ChatRequest(
            conversation_id=self.conversation_id or "",
            messages=messages_to_proto(messages if self.conversation_id else
                                       self.history + messages),
            sampling=sampling_to_proto(params), cache_salt=self.cache_salt or "")
        call = self._call = self.client.stub.Chat(request, timeout=self.client.timeout,
                                                  metadata=self.client.metadata)
        self._cancelled = False
        pieces: list[str] = []
        ids: list[int] = []
        final = None
        received = False
        try:
            for response in call:
                received = True
                if response.conversation_id:
                    self.conversation_id = response.conversation_id
                if response.finish_reason:
                    final = response
                if response.text or response.token_ids or not final:
                    pieces.append(response.text)
                    ids.extend(response.token_ids)
                    yield Chunk(response.text, tuple(response.token_ids))
        except GeneratorExit:
            call.cancel()
            self._record(messages, pieces, ids, None)
            raise
        except grpc.RpcError as e:
            if (self.resume and not received and self.conversation_id and
                    e.code() == grpc.StatusCode.NOT_FOUND and
                    any(m["role"] == "assistant" for m in self.history)):
                raise _Forgotten() from None
            err = from_rpc_error(e)
            # stopped mid-turn (cancel() or the deadline): the server kept the partial reply
            if self.conversation_id and (self._cancelled or
                                         e.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                self._record(messages, pieces, ids, None)
            if not self._cancelled:
                raise err from None
        finally:
            self._call = None
        if final is not None:
            self._record(messages, pieces, ids, final)

    def _record(self, messages, pieces, ids, final: pb.ChatResponse | None) -> None:
        text = "".join(pieces)
        self.history += messages + [{"role": "assistant", "content": text}]
        if final is None:   # stopped early: the server has the usage, we count what arrived
            self.last_reply = Reply(text, tuple(ids), "abort", _partial_usage(len(ids)))
        else:
            self.last_reply = Reply(text, tuple(ids), final.finish_reason,
                                    usage_from_proto(final.usage))

    def cancel(self) -> None:
        """Stop the running turn (from any thread); its reply ends with finish_reason "abort"."""
        call = self._call
        if call is not None:
            self._cancelled = True
            call.cancel()

    def close(self) -> None:
        """End the conversation on the server (frees its cache)."""
        if not self._closed:
            self._closed = True
            if self.conversation_id:
                self.client.end_conversation(self.conversation_id)
