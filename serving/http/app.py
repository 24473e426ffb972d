"""The FastAPI application of the gateway: its routes over a GatewayContext, and errors as
OpenAI's error JSON.

    GET  /v1/models                  the served model
    POST /v1/chat/completions        stateless chat (serving/http/chat_completions.py)
    POST /v1/completions             raw text or token ids (serving/http/completions.py)
    POST /v1/responses               Responses, stateful with previous_response_id
    GET  /v1/responses/{id}          a stored response
    DELETE /v1/responses/{id}        forget it (and end its conversation if latest)
    GET  /health                     200 when the target's gRPC health is SERVING, else 503
    GET  /metrics                    Prometheus text (the gateway's and the server's metrics)

With API keys, everything but /health needs `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving.http.chat_completions import chat_completions
from serving.http.completions import completions
from serving.http.context import GatewayContext
from serving.http.errors import ApiError, unknown_model
from serving.http.metrics import CountRequests
from serving.http.responses import create_response, delete_response, get_response

log = logging.getLogger(__name__)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), kind, None,
                        "not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, "the gateway failed to process the request", "server_error", None,
                        "internal_error").response()


def build_app(ctx: GatewayContext) -> FastAPI:
    """The gateway's app over ctx (no OpenAPI pages: the API is OpenAI's)."""
    app = FastAPI(title="Pensieve OpenAI-compatible API", openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.context = ctx
    app.add_middleware(CountRequests, metrics=ctx.metrics)
    _errors(app)
    created = int(time.time())

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        ctx.caller(request)
        return JSONResponse({"object": "list", "data": [
            {"id": ctx.model_name, "object": "model", "created": created,
             "owned_by": "pensieve"}]})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        ctx.caller(request)
        if model_id != ctx.model_name:
            raise unknown_model(model_id, ctx.model_name)
        return JSONResponse({"id": ctx.model_name, "object": "model", "created": created,
                             "owned_by": "pensieve"})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await chat_completions(ctx, request)

    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        return await completions(ctx, request)

    @app.post("/v1/responses")
    async def respond(request: Request) -> Response:
        return await create_response(ctx, request)

    @app.get("/v1/responses/{response_id}")
    async def get(request: Request, response_id: str) -> Response:
        return await get_response(ctx, request, response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete(request: Request, response_id: str) -> Response:
        return await delete_response(ctx, request, response_id)

    @app.get("/health")
    async def health() -> Response:
        ok = await ctx.upstream.serving()
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        ctx.caller(request)
        return ctx.metrics.exposition(ctx.server_registry)

    return app
