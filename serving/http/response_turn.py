"""One turn of POST /v1/responses on gRPC Chat: which conversation it runs on (`TurnPlan`), and
running it (`ResponseTurn`): the call, its reply whole or as events, and what is stored after.

A turn that continues the latest stored response of a conversation runs on that conversation
(ChatRequest.conversation_id: the kept KV, only the new messages sent). Any other turn starts a
new conversation with the whole history (a fork of an older response resends what it knew).
If the target no longer knows the conversation (expired, evicted) the turn falls back to that.

After the turn, a stored response (store=true) becomes its conversation's latest; a turn that
is not stored, fails or is cut off leaves a conversation nothing can continue: it is ended.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import AsyncIterator

from starlette.requests import Request

from serving.http.caller import Caller
from serving.http.context import GatewayContext
from serving.http.errors import ApiError, not_found
from serving.http.messages import to_proto
from serving.http.response_objects import ResponseDraft, ResponseEvents
from serving.http.response_store import ResponseStore, StoredResponse
from serving.http.sampling import field_names
from serving.http.streams import first
from serving.pensieve.v1 import pensieve_pb2 as pb

log = logging.getLogger(__name__)
Messages = tuple[dict[str, str], ...]


@dataclasses.dataclass(frozen=True)
class TurnPlan:
    instructions: str | None
    history: Messages                      # before this turn (no instructions' message)
    new: Messages                          # this turn's input messages
    continues: StoredResponse | None       # the latest response of the conversation continued

    def chat_request(self, sampling: pb.SamplingParams) -> pb.ChatRequest:
        if self.continues is not None:
            return pb.ChatRequest(conversation_id=self.continues.conversation_id,
                                  messages=to_proto(self.new), sampling=sampling)
        system = () if self.instructions is None else \
            ({"role": "system", "content": self.instructions},)
        return pb.ChatRequest(messages=to_proto(system + self.history + self.new),
                              sampling=sampling)

    def forked(self) -> "TurnPlan":
        """The same turn, resending the whole history as a new conversation."""
        return dataclasses.replace(self, continues=None)


def plan_turn(store: ResponseStore, owner: str, previous_id: str | None,
              instructions: str | None, new: list[dict[str, str]]) -> TurnPlan:
    """The plan of a turn after `previous_id` (404 if unknown or another owner's). Without
    new instructions a continued turn keeps the conversation's; other ones start a fork."""
    if previous_id is None:
        return TurnPlan(instructions, (), tuple(new), None)
    prev = store.get(previous_id, owner)
    if prev is None:
        raise not_found(f"no response {previous_id[:100]!r}", "previous_response_id",
                        "response_not_found")
    if instructions is None:
        instructions = prev.instructions
    stateful = store.is_latest(prev) and instructions == prev.instructions
    return TurnPlan(instructions, prev.history, tuple(new), prev if stateful else None)


class ResponseTurn:
    """Runs one planned turn and keeps the store up to date."""

    def __init__(self, ctx: GatewayContext, caller: Caller, plan: TurnPlan,
                 sampling: pb.SamplingParams, draft: ResponseDraft):
        self.ctx, self.caller, self.plan = ctx, caller, plan
        self.sampling, self.draft = sampling, draft
        self.fields = field_names("max_output_tokens", "input")
        self.conversation_id = ""
        self.settled = False              # stored, or its conversation ended

    async def start(self, request: Request) -> AsyncIterator[pb.ChatResponse]:
        """Open the call and wait until the target took the turn (errors surface here)."""
        while True:
            stream = self.ctx.upstream.chat(self.plan.chat_request(self.sampling),
                                            self.caller.metadata, self.fields)
            try:
                head, stream = await first(stream, request)
            except ApiError as e:
                if e.status == 404 and self.plan.continues is not None:
                    self.ctx.store.advance(self.plan.continues.conversation_id)
                    self.plan = self.plan.forked()        # the target forgot it: resend all
                    continue
                raise
            if head is None:
                raise ApiError(502, "the target ended the turn before taking it",
                               "server_error", None, "bad_gateway")
            self.conversation_id = head.conversation_id
            return stream

    async def _pieces(self, stream: AsyncIterator[pb.ChatResponse]
                      ) -> AsyncIterator[str | pb.ChatResponse]:
        """The reply's text pieces, then the last message (finish reason and usage)."""
        async for response in stream:
            if response.text:
                yield response.text
            if response.finish_reason:
                if response.finish_reason == "abort":
                    raise ApiError(503, "the turn was aborted (the server is shutting down)",
                                   "service_unavailable", None, "aborted")
                yield response
                return
        raise ApiError(502, "the target ended the turn without a result", "server_error",
                       None, "bad_gateway")

    async def whole(self, stream: AsyncIterator[pb.ChatResponse]) -> dict:
        """The finished response object."""
        pieces = []
        try:
            async for item in self._pieces(stream):
                if isinstance(item, str):
                    pieces.append(item)
                else:
                    return self._complete("".join(pieces), item)
        finally:
            self._settle()
        raise AssertionError("unreachable: _pieces ends with the last message")

    async def events(self, stream: AsyncIterator[pb.ChatResponse]) -> AsyncIterator[bytes]:
        """The response's SSE events."""
        events = ResponseEvents(self.draft)
        for event in events.opening():
            yield event
        pieces = []
        try:
            async for item in self._pieces(stream):
                if isinstance(item, str):
                    pieces.append(item)
                    yield events.delta(item)
                else:
                    text = "".join(pieces)
                    for event in events.closing(text, self._complete(text, item)):
                        yield event
        except ApiError as e:
            yield events.failed(e.body()["error"])
        finally:
            self._settle()

    def _complete(self, text: str, last: pb.ChatResponse) -> dict:
        final = self.draft.object(text=text, finish_reason=last.finish_reason,
                                  usage=last.usage)
        if self.draft.request.store:
            reply = ({"role": "assistant", "content": text},)
            self.ctx.store_response(StoredResponse(
                self.draft.id, self.caller.owner, self.conversation_id, self.plan.instructions,
                self.plan.history + self.plan.new + reply, final, self.caller.metadata))
            self.settled = True
        return final

    def _settle(self) -> None:
        """Not stored (store=false, failed, cut off): nothing can continue the conversation."""
        if not self.settled and self.conversation_id:
            self.settled = True
            self.ctx.store.advance(self.conversation_id)
            self.ctx.end_later(self.conversation_id, self.caller.metadata)
