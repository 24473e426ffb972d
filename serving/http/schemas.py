"""The request bodies of the OpenAI endpoints, validated strictly (pydantic, strict mode).

Unknown top-level fields are accepted and ignored (clients send extras); every known field is
checked for its type (no coercion: "5" is not a number, true is not 1) and basic range, and a
bad one is a 400 whose `param` names it ("messages[2].content", "temperature"). Value ranges
the engine decides (temperature, top_p, a prompt's length) are checked by the target server,
whose INVALID_ARGUMENT comes back as a 400 naming the field too.

Extensions beyond OpenAI's fields, as vLLM has them: `top_k` and `ignore_eos`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from serving.errors import clip
from serving.http.errors import invalid

UINT32 = 1 << 32
INT32 = 1 << 31


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class SamplingFields(_Strict):
    """Sampling fields shared by the endpoints."""
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=0, lt=INT32)
    seed: int | None = Field(None, ge=0, lt=UINT32)
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None
    stream: bool | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, lt=UINT32)
    max_completion_tokens: int | None = Field(None, ge=1, lt=UINT32)
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list[Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, lt=UINT32)
    n: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class InputItem(_Strict):
    """A Responses input item: a message ({"role", "content"}, "type" "message" or absent)."""
    type: Literal["message"] | None = None
    role: str
    content: str | list[ContentPart]


class ResponseRequest(SamplingFields):
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    max_output_tokens: int | None = Field(None, ge=1, lt=UINT32)
    metadata: dict[str, str] | None = None
    tools: list[Any] | None = None


Model = TypeVar("Model", bound=BaseModel)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _param(loc: tuple) -> str:
    """A pydantic error location as a field path ("messages[2].content"), union tags left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part.lower() not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out


def parse(model: type[Model], body: dict[str, Any]) -> Model:
    """body validated as `model`, or a 400 naming the first bad field."""
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        first = e.errors(include_url=False)[0]
        param = _param(tuple(first["loc"])) or None
        what = "missing" if first["type"] == "missing" else \
            f"{first['msg']} (got {clip(first.get('input'))})"
        raise invalid(f"invalid field {param or 'in the body'}: {what}", param) from None


def reject_unsupported(request: BaseModel, **fields: object) -> None:
    """400 for a field the gateway does not support, when it is set to anything but its
    harmless value (`fields` maps a name to that value)."""
    for name, harmless in fields.items():
        value = getattr(request, name)
        if value is not None and value != harmless and value != []:
            raise invalid(f"{name}={clip(value)} is not supported by this server", name,
                          "unsupported_value")
