"""POST /v1/chat/completions: stateless chat over gRPC Generate with `messages`.

The server renders the messages through the model's chat template and runs them as an
anonymous engine conversation, so a client that resends its history every turn adopts the
cached conversation with the longest matching prefix: `usage.prompt_tokens_details.
cached_tokens` counts what was reused. The gateway keeps no state for it.
"""

from __future__ import annotations

import dataclasses
import time

from starlette.requests import Request
from starlette.responses import Response

from serving.auth import new_id
from serving.http.context import GatewayContext
from serving.http.generation import answer
from serving.http.messages import chat_messages, ends_with_user, to_proto
from serving.http.sampling import field_names, sampling_proto
from serving.http.schemas import ChatCompletionRequest, reject_unsupported
from serving.http.usage import completion_usage
from serving.pensieve.v1 import pensieve_pb2 as pb


@dataclasses.dataclass(frozen=True)
class ChatShape:
    """chat.completion and chat.completion.chunk objects of one turn."""
    id: str
    model: str
    created: int
    include_usage: bool = False

    def _chunk(self, delta: dict, finish_reason: str | None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def whole(self, text: str, finish_reason: str, usage: pb.Usage) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                     "refusal": None},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": completion_usage(usage)}

    def opening(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def piece(self, text: str) -> dict:
        return self._chunk({"content": text}, None)

    def closing(self, finish_reason: str) -> dict:
        return self._chunk({}, finish_reason)

    def usage(self, usage: pb.Usage) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": [],
                "usage": completion_usage(usage)}


async def chat_completions(ctx: GatewayContext, request: Request) -> Response:
    caller = ctx.caller(request)
    req = await ctx.body(request, ChatCompletionRequest)
    reject_unsupported(req, n=1, logprobs=False, top_logprobs=0, presence_penalty=0.0,
                       frequency_penalty=0.0, tools=None)
    messages = chat_messages(req.messages)
    ends_with_user(messages, "messages", roles=("user", "tool"))
    limit_field = "max_completion_tokens" if req.max_completion_tokens is not None else \
        "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else \
        req.max_tokens
    grpc_request = pb.GenerateRequest(messages=pb.Messages(messages=to_proto(messages)),
                                      sampling=sampling_proto(req, max_tokens))
    include_usage = bool(req.stream and req.stream_options and
                         req.stream_options.include_usage)
    shape = ChatShape(new_id("chatcmpl-"), ctx.model_name, int(time.time()), include_usage)
    responses = ctx.upstream.generate(grpc_request, caller.metadata,
                                      field_names(limit_field, "messages"))
    return await answer(request, responses, shape, bool(req.stream), include_usage)
