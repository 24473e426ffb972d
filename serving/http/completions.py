"""POST /v1/completions: raw text or token ids, no chat template (gRPC Generate with `text` or
`token_ids`). One prompt per request (a list of one prompt is accepted)."""

from __future__ import annotations

import dataclasses
import time

from starlette.requests import Request
from starlette.responses import Response

from serving.auth import new_id
from serving.http.context import GatewayContext
from serving.http.errors import invalid
from serving.http.generation import answer
from serving.http.sampling import field_names, sampling_proto
from serving.http.schemas import CompletionRequest, reject_unsupported
from serving.http.usage import completion_usage
from serving.pensieve.v1 import pensieve_pb2 as pb


@dataclasses.dataclass(frozen=True)
class CompletionShape:
    """text_completion objects of one turn (streamed chunks have the same shape)."""
    id: str
    model: str
    created: int
    include_usage: bool = False

    def _object(self, text: str, finish_reason: str | None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.model, "system_fingerprint": None,
               "choices": [{"index": 0, "text": text, "logprobs": None,
                            "finish_reason": finish_reason}]}
        if self.include_usage:
            out["usage"] = None
        return out

    def whole(self, text: str, finish_reason: str, usage: pb.Usage) -> dict:
        out = self._object(text, finish_reason)
        out["usage"] = completion_usage(usage)
        return out

    def opening(self) -> None:
        return None

    def piece(self, text: str) -> dict:
        return self._object(text, None)

    def closing(self, finish_reason: str) -> dict:
        return self._object("", finish_reason)

    def usage(self, usage: pb.Usage) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": [],
                "usage": completion_usage(usage)}


def prompt_request(prompt: str | list) -> pb.GenerateRequest:
    """The Generate request of `prompt`: text, token ids, or a list holding one of them."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise invalid(f"only one prompt per request is supported, got {len(prompt)}",
                          "prompt", "unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt is empty", "prompt")
        return pb.GenerateRequest(text=prompt)
    if not prompt:
        raise invalid("prompt is empty", "prompt")
    try:
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt))
    except ValueError:
        raise invalid("prompt token ids must fit in int32", "prompt") from None


async def completions(ctx: GatewayContext, request: Request) -> Response:
    caller = ctx.caller(request)
    req = await ctx.body(request, CompletionRequest)
    reject_unsupported(req, n=1, best_of=1, logprobs=None, echo=False, suffix="",
                       presence_penalty=0.0, frequency_penalty=0.0)
    grpc_request = prompt_request(req.prompt)
    grpc_request.sampling.CopyFrom(sampling_proto(req, req.max_tokens))
    include_usage = bool(req.stream and req.stream_options and
                         req.stream_options.include_usage)
    shape = CompletionShape(new_id("cmpl-"), ctx.model_name, int(time.time()), include_usage)
    responses = ctx.upstream.generate(grpc_request, caller.metadata,
                                      field_names("max_tokens", "prompt"))
    return await answer(request, responses, shape, bool(req.stream), include_usage)
