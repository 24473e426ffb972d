"""Conversions between the pensieve.v1 messages and the library's types."""

from __future__ import annotations

from typing import Iterable

from pensieve_jax.engine.request import Usage
from pensieve_jax.engine.sampling import SamplingParams
from serving.pensieve.v1 import pensieve_pb2 as pb

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed")


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """SamplingParams from the message (unset fields: the defaults); ValueError if invalid."""
    kw = {name: getattr(msg, name) for name in _OPTIONAL if msg.HasField(name)}
    return SamplingParams(**kw, stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
                          ignore_eos=msg.ignore_eos)


def sampling_to_proto(params: SamplingParams | None) -> pb.SamplingParams:
    params = params or SamplingParams()
    msg = pb.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                            top_p=params.top_p, top_k=params.top_k, stop=list(params.stop),
                            stop_token_ids=list(params.stop_token_ids),
                            ignore_eos=params.ignore_eos)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def usage_to_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                    prefilled_tokens=usage.prefilled_tokens,
                    recomputed_tokens=usage.recomputed_tokens,
                    completion_tokens=usage.completion_tokens, ttft_s=usage.ttft_s,
                    total_s=usage.total_s, cached_disk_tokens=usage.cached_disk_tokens)


def usage_from_proto(msg: pb.Usage) -> Usage:
    return Usage(prompt_tokens=msg.prompt_tokens, cached_tokens=msg.cached_tokens,
                 prefilled_tokens=msg.prefilled_tokens, recomputed_tokens=msg.recomputed_tokens,
                 completion_tokens=msg.completion_tokens, ttft_s=msg.ttft_s, total_s=msg.total_s,
                 cached_disk_tokens=msg.cached_disk_tokens)


def messages_from_proto(messages: Iterable[pb.Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def messages_to_proto(messages: Iterable[dict[str, str]]) -> list[pb.Message]:
    return [pb.Message(role=m["role"], content=m["content"]) for m in messages]
