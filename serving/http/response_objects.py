"""The Responses API's objects: the response (`object: "response"`), its output message, and
the streaming events of one response, in OpenAI's shapes.

Streamed events, in order: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta (one per piece),
response.output_text.done, response.content_part.done, response.output_item.done, and
response.completed (response.incomplete when max_output_tokens cut the reply short).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

from serving.auth import new_id
from serving.http.schemas import ResponseRequest
from serving.http.streams import named
from serving.http.usage import response_usage
from serving.pensieve.v1 import pensieve_pb2 as pb


@dataclasses.dataclass
class ResponseDraft:
    """One response being made: its ids, the request's settings, and the object at each stage."""
    request: ResponseRequest
    model: str
    id: str = dataclasses.field(default_factory=lambda: new_id("resp_"))
    message_id: str = dataclasses.field(default_factory=lambda: new_id("msg_"))
    created_at: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, text: str | None, status: str) -> dict[str, Any]:
        """The output message (no content part before the text starts: text None)."""
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant", "content": [] if text is None else [self.part(text)]}

    def object(self, status: str = "in_progress", text: str | None = None,
               finish_reason: str | None = None, usage: pb.Usage | None = None
               ) -> dict[str, Any]:
        """The response object; finished (text and usage given): "completed", or "incomplete"
        when the reply was cut by max_output_tokens."""
        r = self.request
        incomplete = None
        if usage is not None:
            status = "incomplete" if finish_reason == "length" else "completed"
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
        return {"id": self.id, "object": "response", "created_at": self.created_at,
                "status": status, "error": None, "incomplete_details": incomplete,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "model": self.model,
                "output": [] if usage is None else [self.item(text, "completed" if status ==
                                                              "completed" else "incomplete")],
                "parallel_tool_calls": False, "previous_response_id": r.previous_response_id,
                "store": r.store, "temperature": r.temperature, "top_p": r.top_p,
                "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
                "truncation": "disabled", "metadata": dict(r.metadata or {}),
                "usage": None if usage is None else response_usage(usage)}


class ResponseEvents:
    """The SSE events of one streamed response (each with its sequence_number)."""

    def __init__(self, draft: ResponseDraft):
        self.draft = draft
        self.sequence = itertools.count()

    def event(self, kind: str, **fields: Any) -> bytes:
        return named(kind, {"type": kind, "sequence_number": next(self.sequence), **fields})

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.draft.message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[bytes]:
        d = self.draft
        return [self.event("response.created", response=d.object()),
                self.event("response.in_progress", response=d.object()),
                self.event("response.output_item.added", output_index=0,
                           item=d.item(None, "in_progress")),
                self.event("response.content_part.added", part=d.part(""), **self._at())]

    def delta(self, text: str) -> bytes:
        return self.event("response.output_text.delta", delta=text, logprobs=[], **self._at())

    def closing(self, text: str, final: dict[str, Any]) -> list[bytes]:
        """final: the finished response object."""
        d = self.draft
        done = "response.completed" if final["status"] == "completed" else \
            "response.incomplete"
        return [self.event("response.output_text.done", text=text, logprobs=[], **self._at()),
                self.event("response.content_part.done", part=d.part(text), **self._at()),
                self.event("response.output_item.done", output_index=0,
                           item=final["output"][0]),
                self.event(done, response=final)]

    def failed(self, error: dict[str, Any]) -> bytes:
        """error: OpenAI's error object ({"message", "type", "param", "code"})."""
        return self.event("error", message=error["message"], code=error["code"],
                          param=error["param"])
