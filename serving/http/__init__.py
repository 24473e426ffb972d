"""An OpenAI-compatible HTTP API (FastAPI on uvicorn) as a gateway over the Pensieve gRPC API.

    gw = HttpGateway(grpc_target, model_name="smollm2", api_keys=ApiKeys(["k"]) or None)
    port = await gw.start("127.0.0.1", 8000)      # on the running event loop; 0: a free port
    await gw.shutdown()

`BackgroundHttp(...)` runs one on its own thread (tests, notebooks); `gw.app` is the FastAPI
app. The target is a `pensieve serve` server or a router (the same gRPC API), so `serve`,
`router` and `cluster` expose the same HTTP API, and every gRPC validation, limit and ownership
rule applies unchanged: the caller's `Authorization: Bearer KEY` goes on as gRPC metadata.

Chat completions are stateless (gRPC Generate with `messages`: a client resending its history
adopts the cached conversation with the longest matching prefix); Responses with
`previous_response_id` continue a kept conversation (gRPC Chat with its conversation id).

    gateway.py          HttpGateway: the app on uvicorn, start/shutdown
    background.py       BackgroundHttp: one on its own thread
    app.py              the routes, errors as OpenAI error JSON
    context.py          what the endpoints share; the first steps of every POST
    chat_completions.py POST /v1/chat/completions
    completions.py      POST /v1/completions
    responses.py        POST/GET/DELETE /v1/responses
    response_turn.py    one Responses turn: which conversation, running it, storing it
    response_objects.py response objects and streaming events
    response_store.py   the stored responses (bounded)
    generation.py       a Generate turn answered whole or as SSE chunks
    upstream.py         the gRPC channel to the target
    caller.py           the caller's owner and key
    body.py             body size limit and JSON
    schemas.py          request validation
    messages.py         OpenAI messages -> chat messages
    sampling.py         sampling fields -> SamplingParams
    usage.py            usage objects (cached tokens)
    streams.py          server-sent events, client disconnects
    metrics.py          the gateway's Prometheus metrics
    errors.py           OpenAI error JSON; gRPC status -> HTTP status
"""

from serving.http.background import BackgroundHttp
from serving.http.errors import ApiError
from serving.http.gateway import HttpGateway

__all__ = ["ApiError", "BackgroundHttp", "HttpGateway"]
