"""OpenAI message shapes -> plain chat messages ({"role", "content"} with text content).

Content is a string or a list of text parts ({"type": "text"} in chat completions,
"input_text" / "output_text" in Responses), joined with newlines; any other part (images,
audio, files) is a 400 naming it. The role "developer" is the model's "system".
"""

from __future__ import annotations

from typing import Sequence

from serving.errors import clip
from serving.http.errors import invalid
from serving.http.schemas import ChatMessage, ContentPart, InputItem
from serving.pensieve.v1 import pensieve_pb2 as pb

ROLES = ("system", "user", "assistant", "tool")
ALIASES = {"developer": "system"}
TEXT_PARTS = ("text", "input_text", "output_text")


def _role(role: str, param: str) -> str:
    role = ALIASES.get(role, role)
    if role not in ROLES:
        raise invalid(f"{param}: unknown role {clip(role)} (known: {', '.join(ROLES)}, "
                      "developer)", param)
    return role


def _text(content: str | list[ContentPart] | None, param: str, required: bool) -> str:
    if content is None:
        if required:
            raise invalid(f"{param} is missing", param)
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for j, part in enumerate(content):
        if part.type not in TEXT_PARTS:
            raise invalid(f"{param}[{j}].type: only text content is supported, got "
                          f"{clip(part.type)}", f"{param}[{j}].type", "unsupported_value")
        if part.text is None:
            raise invalid(f"{param}[{j}].text is missing", f"{param}[{j}].text")
        pieces.append(part.text)
    return "\n".join(pieces)


def chat_messages(messages: Sequence[ChatMessage], param: str = "messages"
                  ) -> list[dict[str, str]]:
    """Chat completions messages; an assistant's content may be null (as OpenAI allows)."""
    out = []
    for i, m in enumerate(messages):
        role = _role(m.role, f"{param}[{i}].role")
        out.append({"role": role, "content": _text(m.content, f"{param}[{i}].content",
                                                    required=role != "assistant")})
    return out


def input_messages(items: str | Sequence[InputItem], param: str = "input"
                   ) -> list[dict[str, str]]:
    """Responses `input`: a user's text or a list of message items."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise invalid(f"{param} is empty", param)
    return [{"role": _role(m.role, f"{param}[{i}].role"),
             "content": _text(m.content, f"{param}[{i}].content", required=True)}
            for i, m in enumerate(items)]


def ends_with_user(messages: Sequence[dict[str, str]], param: str,
                   roles: Sequence[str] = ("user",)) -> None:
    """A turn must end with the user's message (or one of `roles`)."""
    if not messages or messages[-1]["role"] not in roles:
        last = messages[-1]["role"] if messages else None
        raise invalid(f"{param} must end with a user message, not {clip(last)}", param)


def to_proto(messages: Sequence[dict[str, str]]) -> list[pb.Message]:
    return [pb.Message(role=m["role"], content=m["content"]) for m in messages]
