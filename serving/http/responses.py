"""POST /v1/responses, GET and DELETE /v1/responses/{id}: the Responses API on gRPC Chat.

`previous_response_id` continues the stored conversation on its kept KV (see
serving/http/response_turn.py); responses belong to the key that created them (another key, or
an unknown id: 404). `instructions` become the conversation's system message; a continued turn
without instructions keeps its conversation's (unlike OpenAI, which drops them: here they are
in the kept KV), and different instructions start a new conversation from the history.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving.errors import clip
from serving.http.context import GatewayContext
from serving.http.errors import not_found
from serving.http.messages import ends_with_user, input_messages
from serving.http.response_objects import ResponseDraft
from serving.http.response_store import StoredResponse
from serving.http.response_turn import ResponseTurn, plan_turn
from serving.http.sampling import sampling_proto
from serving.http.schemas import ResponseRequest, reject_unsupported
from serving.http.streams import ClientGone, client_closed, event_stream, unless_disconnected


async def create_response(ctx: GatewayContext, request: Request) -> Response:
    caller = ctx.caller(request)
    req = await ctx.body(request, ResponseRequest)
    reject_unsupported(req, tools=None)
    new = input_messages(req.input)
    ends_with_user(new, "input")
    plan = plan_turn(ctx.store, caller.owner, req.previous_response_id, req.instructions, new)
    turn = ResponseTurn(ctx, caller, plan, sampling_proto(req, req.max_output_tokens),
                        ResponseDraft(req, ctx.model_name))
    try:
        stream = await turn.start(request)
    except ClientGone:
        return client_closed()
    if req.stream:
        return event_stream(turn.events(stream))
    try:
        return JSONResponse(await unless_disconnected(request, turn.whole(stream)))
    except ClientGone:
        return client_closed()


def _stored(ctx: GatewayContext, request: Request, response_id: str) -> StoredResponse:
    entry = ctx.store.get(response_id, ctx.caller(request).owner)
    if entry is None:
        raise not_found(f"no response {clip(response_id)}", None, "response_not_found")
    return entry


async def get_response(ctx: GatewayContext, request: Request, response_id: str) -> Response:
    return JSONResponse(_stored(ctx, request, response_id).response)


async def delete_response(ctx: GatewayContext, request: Request, response_id: str) -> Response:
    """Forget a stored response; if it was its conversation's latest, end the conversation."""
    entry = _stored(ctx, request, response_id)
    if ctx.store.delete(entry):
        await ctx.upstream.end(entry.conversation_id, ctx.caller(request).metadata)
    return JSONResponse({"id": entry.id, "object": "response", "deleted": True})
