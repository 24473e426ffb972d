"""OpenAI sampling fields -> pensieve.v1.SamplingParams, and the target's field names -> the
HTTP request's (for the `param` of a 400 the target reports)."""

from __future__ import annotations

from serving.errors import clip
from serving.http.errors import invalid
from serving.http.schemas import SamplingFields
from serving.pensieve.v1 import pensieve_pb2 as pb

MAX_STOP = 4          # as OpenAI: up to 4 stop sequences


def stop_list(stop: str | list[str] | None) -> list[str]:
    """`stop` as a list (a string is one stop sequence); 400 beyond MAX_STOP or for an empty
    one."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise invalid(f"stop takes at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    for s in stops:
        if not s:
            raise invalid("stop sequences must not be empty", "stop")
    return stops


def sampling_proto(request: SamplingFields, max_tokens: int | None) -> pb.SamplingParams:
    """The SamplingParams of a request (unset fields: the engine's defaults)."""
    msg = pb.SamplingParams(stop=stop_list(request.stop), ignore_eos=bool(request.ignore_eos))
    for name, value in (("max_tokens", max_tokens), ("temperature", request.temperature),
                        ("top_p", request.top_p), ("top_k", request.top_k),
                        ("seed", request.seed)):
        if value is not None:
            try:
                setattr(msg, name, value)
            except (ValueError, TypeError):
                raise invalid(f"{name} out of range: {clip(value)}", name) from None
    return msg


def field_names(max_tokens: str, prompt: str) -> dict[str, str]:
    """The target's field names (as its messages say them) -> this request's field names."""
    return {"max_tokens": max_tokens, "temperature": "temperature", "top_p": "top_p",
            "top_k": "top_k", "seed": "seed", "stop": "stop", "stop_token_ids": "stop",
            "messages": prompt, "message": prompt, "prompt": prompt, "token_ids": prompt,
            "text": prompt, "max_model_len": prompt, "role": prompt, "content": prompt}
