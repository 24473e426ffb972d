"""Token accounting of a turn (pensieve.v1.Usage) in OpenAI's shapes.

Both carry the engine's real reuse: `cached_tokens` are prompt tokens whose KV came from the
cache. `pensieve` adds what OpenAI has no field for: the part of those loaded back from page
files on disk (cached_disk_tokens), prompt tokens computed for the first time (prefilled) or
again (recomputed), and the engine's time to first token and turn time.
"""

from __future__ import annotations

from typing import Any

from serving.pensieve.v1 import pensieve_pb2 as pb


def _pensieve(usage: pb.Usage) -> dict[str, Any]:
    return {"cached_disk_tokens": usage.cached_disk_tokens,
            "prefilled_tokens": usage.prefilled_tokens,
            "recomputed_tokens": usage.recomputed_tokens,
            "ttft_s": round(usage.ttft_s, 6), "total_s": round(usage.total_s, 6)}


def completion_usage(usage: pb.Usage) -> dict[str, Any]:
    """Chat completions and completions: usage.prompt_tokens_details.cached_tokens."""
    return {"prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            "pensieve": _pensieve(usage)}


def response_usage(usage: pb.Usage) -> dict[str, Any]:
    """Responses: usage.input_tokens_details.cached_tokens."""
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "pensieve": _pensieve(usage)}
