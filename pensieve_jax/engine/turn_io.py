"""A turn as a caller hands it in (checked, then made into a Request: Engine.submit) and as a
caller takes its tokens out (without a final stop token: Engine.generate, strip_stop)."""

from __future__ import annotations

import secrets
import uuid
from typing import Callable, Sequence

import numpy as np

from pensieve_jax.engine.request import (Request, RequestHandle, RequestOutput, check_prompt,
                                         check_sampling)
from pensieve_jax.engine.sampling import SamplingParams


def checked_request(prompt_token_ids: Sequence[int], params: SamplingParams | None,
                    conversation_id: str | None, cache_salt: str | None, vocab_size: int,
                    max_model_len: int, on_cancel: Callable[[str], None]) -> Request:
    """The Request of a turn a caller submits, with a new handle (on_cancel: what its cancel()
    calls with the request id). Raises ValueError for bad input, naming the field (TypeError
    for a cache_salt that is not a string). The seed is params.seed, or random."""
    params = params or SamplingParams()
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise TypeError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
    check_sampling(params, vocab_size, max_model_len)
    prompt = check_prompt(prompt_token_ids, vocab_size, max_model_len)
    seed = params.seed if params.seed is not None else secrets.randbits(32)
    handle = RequestHandle(uuid.uuid4().hex, conversation_id, on_cancel)
    return Request(handle.request_id, prompt, params, seed, conversation_id, handle,
                   cache_salt or "")


def without_stop(output: RequestOutput) -> list[int]:
    """A finished turn's token ids without the stop token that ended it (a stop string's tokens
    stay)."""
    ids = list(output.token_ids)
    if output.finish_reason == "stop" and ids and output.stop_text_index is None:
        ids.pop()
    return ids


def submit_and_wait(submit: Callable[..., RequestHandle], prompt_token_ids,
                    params: SamplingParams | None = None):
    """Submit one prompt (a list of ids) or a batch (a list of lists) with submit(prompt,
    params) and wait for them: the new token ids per prompt (a list of lists for a batch),
    without a final stop token."""
    batch = len(prompt_token_ids) > 0 and not isinstance(prompt_token_ids[0], (int, np.integer))
    prompts = prompt_token_ids if batch else [prompt_token_ids]
    handles = [submit(p, params) for p in prompts]
    outs = [without_stop(h.result()) for h in handles]
    return outs if batch else outs[0]
