"""What every endpoint of the gateway shares: the target, the served model's name, the keys, the
body limit, the stored responses and the metrics; and the steps every POST takes first
(identify the caller, read and validate the body, check the model)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from starlette.requests import Request

from serving.auth import ApiKeys
from serving.http.body import read_json
from serving.http.caller import Caller, identify
from serving.http.errors import unknown_model
from serving.http.metrics import GatewayMetrics
from serving.http.response_store import ResponseStore, StoredResponse
from serving.http.schemas import parse
from serving.http.upstream import Upstream

log = logging.getLogger(__name__)
Model = TypeVar("Model", bound=BaseModel)


@dataclasses.dataclass
class GatewayContext:
    upstream: Upstream
    model_name: str
    api_keys: ApiKeys | None
    max_request_bytes: int
    store: ResponseStore
    metrics: GatewayMetrics
    server_registry: CollectorRegistry | None = None
    background: set[asyncio.Task] = dataclasses.field(default_factory=set)

    def caller(self, request: Request) -> Caller:
        """The request's caller; 401 without a valid key when keys are enabled."""
        return identify(request, self.api_keys)

    async def body(self, request: Request, schema: type[Model]) -> Model:
        """The JSON body (413 beyond max_request_bytes), validated (400) as schema, for the
        served model (404 for another one)."""
        parsed = parse(schema, await read_json(request, self.max_request_bytes))
        model = getattr(parsed, "model", None)
        if model != self.model_name:
            raise unknown_model(model, self.model_name)
        return parsed

    def end_later(self, conversation_id: str, metadata: Any) -> None:
        """End a conversation on the target in the background (nothing can continue it)."""
        if not conversation_id:
            return

        async def end():
            try:
                await self.upstream.end(conversation_id, metadata)
            except Exception as e:           # the target may be gone; its TTL cleans up
                log.warning("could not end conversation %s: %s", conversation_id, e)
        task = asyncio.ensure_future(end())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def store_response(self, entry: StoredResponse) -> None:
        """Store a response; conversations of the responses dropped for room are ended."""
        for old in self.store.put(entry):
            self.end_later(old.conversation_id, old.metadata)
