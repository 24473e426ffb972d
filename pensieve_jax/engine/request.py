"""Requests, their results, and the handle a caller waits on.

A request is one turn of one conversation: the conversation's whole token sequence so far
(`token_ids`, the cached prefix included) plus what the turn generates.

Token accounting of one turn: see `Usage`.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from typing import Callable, Iterator, NamedTuple, Sequence

from pensieve_jax.engine.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token accounting of one turn. Every prompt token is counted once, in one of three fields:
    prompt_tokens == cached_tokens + prefilled_tokens + recomputed_tokens.

    | cached_tokens     | prompt tokens whose KV the turn reused (not computed for them)    |
    | recomputed_tokens | prompt tokens computed although their KV had existed: the         |
    |                   | conversation's earlier sequence (history it lost or never kept),  |
    |                   | or KV found cached when the turn was restored but then dropped or |
    |                   | recomputed instead of loaded                                      |
    | prefilled_tokens  | the rest: prompt tokens new to the conversation, computed         |

    cached_host_tokens, cached_disk_tokens and cached_shared_tokens are parts of cached_tokens
    (host and disk: the tiers its KV was loaded back from; shared: pages of other
    conversations, on any tier). A preempted turn
    loses its KV, is restored again and recomputes what is missing: all the fields describe
    the run that finished (from the turn's last restore), so work lost to a preemption is in
    none of them (Engine.stats(): "preemptions", "step_tokens"), a token the turn prefilled
    before a preemption is still a prefilled token when computed again, and cached_* is what
    the turn finally reused. (Aborted turns report the run that was cut short.)"""
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    recomputed_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    cached_host_tokens: int = 0    # part of cached_tokens that was loaded back from host memory
    cached_disk_tokens: int = 0    # part of cached_tokens that was loaded back from page files
    cached_shared_tokens: int = 0  # part of cached_tokens on pages shared with other conversations


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    conversation_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]     # generated, including a final stop token if one was sampled
    finish_reason: str             # "stop" (stop token or string), "length" or "abort"
    stop_text_index: int | None    # where a matched stop string starts in the decoded output
    usage: Usage


class TokenEvent(NamedTuple):
    token_ids: tuple[int, ...]       # new tokens since the last event
    output: RequestOutput | None     # set on the last event
    text: str = ""                   # their text (special tokens skipped; "" while a character
                                     # is incomplete): the engine decodes each token once


class RequestHandle:
    """What `Engine.submit` returns: iterate for token events, or wait with `result()`;
    `cancel()` stops the turn (its conversation keeps the tokens produced so far)."""

    def __init__(self, request_id: str, conversation_id: str | None,
                 on_cancel: Callable[[str], None] | None = None):
        self.request_id = request_id
        self.conversation_id = conversation_id
        self._events: queue.Queue = queue.Queue()
        self._output: RequestOutput | None = None
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        if self._on_cancel is not None and self._output is None:
            self._on_cancel(self.request_id)

    def put(self, item: "TokenEvent | BaseException") -> None:
        """(the engine) The next event, or the exception that ends the turn."""
        self._events.put(item)

    def __iter__(self) -> Iterator[TokenEvent]:
        while self._output is None:
            item = self._events.get()
            if isinstance(item, BaseException):
                raise item
            if item.output is not None:
                self._output = item.output
                self.conversation_id = item.output.conversation_id
            yield item

    def result(self) -> RequestOutput:
        for _ in self:
            pass
        return self._output


class Request:
    """Mutable state of one in-flight turn, owned by the engine loop."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, seed: int,
                 conversation_id: str | None, handle: RequestHandle, salt: str = ""):
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.seed = seed
        self.requested_conversation = conversation_id
        self.salt = salt                  # cache salt: shares pages only with the same salt
        self.handle = handle
        self.conversation = None          # set at admission (Conversation)
        self.output: list[int] = []
        # the overlapped engine loop dispatches a turn's next decode before it has the token
        # that decode reads: token_ids and output end with `pending` placeholders (0, or 1 from
        # a planned step's view) until the step that samples them is fetched; pending_row is
        # that step's row which samples the last one (its device output feeds the next step)
        self.pending = 0
        self.pending_row = -1
        self.finish_reason: str | None = None
        self.stop_text_index: int | None = None
        self.known_len = 0                # prompt prefix whose KV had existed before this turn
                                          # computed it (history, or cached at a restore)
        self.restored = False             # its pages are all on the device (or being copied)
        self.loading = False              # ... and some are still being copied from host
        self.front_done = self.front_end = 0   # a dropped prefix being recomputed
        self.cached = self.cached_host = self.prefilled = self.recomputed = 0  # Usage, this run
        self.cached_shared = 0            # cached tokens on pages shared with other conversations
        self.cached_disk = 0              # cached tokens loaded back from page files
        self.waited = 0                   # scheduling steps spent waiting (fairness bound)
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.text = None                  # the reply's TextStream (the engine sets it)
        self.isolated = False             # in a failed step with others: runs alone from now
        self.failed = False               # ended by a failed step (TurnFailed delivered)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return self.conversation.token_ids

    @property
    def num_computed(self) -> int:
        return self.conversation.num_computed

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model (the last sampled token is run only to keep
        the conversation's cache complete after the turn)."""
        return (self.front_end - self.front_done) + len(self.token_ids) - self.num_computed

    def count_computed(self, start: int, end: int) -> None:
        """Account tokens [start, end) of the sequence just computed (each prompt token is
        computed once per run: a preemption starts the count again, see reset_usage)."""
        prompt_end = len(self.prompt)
        for lo, hi, field in ((0, self.known_len, "recomputed"), (self.known_len, prompt_end,
                                                                   "prefilled")):
            n = max(0, min(end, hi, prompt_end) - max(start, lo))
            setattr(self, field, getattr(self, field) + n)

    def reset_usage(self) -> None:
        """The turn's KV is gone (preempted, or dropped while it waited): what it reused and
        computed so far no longer counts; its next restore and run are accounted afresh."""
        self.cached = self.cached_host = self.cached_disk = self.cached_shared = 0
        self.prefilled = self.recomputed = 0

    def make_output(self) -> RequestOutput:
        now = time.perf_counter()
        first = self.first_token_time or now
        return RequestOutput(
            request_id=self.id,
            conversation_id=self.conversation.id if self.conversation else
            (self.requested_conversation or ""),
            prompt_token_ids=tuple(self.prompt), token_ids=tuple(self.output),
            finish_reason=self.finish_reason, stop_text_index=self.stop_text_index,
            usage=Usage(prompt_tokens=len(self.prompt), cached_tokens=self.cached,
                        prefilled_tokens=self.prefilled, recomputed_tokens=self.recomputed,
                        completion_tokens=len(self.output), ttft_s=first - self.arrival,
                        total_s=now - self.arrival, cached_host_tokens=self.cached_host,
                        cached_disk_tokens=self.cached_disk,
                        cached_shared_tokens=min(self.cached_shared, self.cached)))


def check_prompt(ids: Sequence[int], vocab_size: int, max_model_len: int) -> list[int]:
    """Validated token ids of a turn, or a clear TypeError / ValueError."""
    if isinstance(ids, (str, bytes)):
        raise TypeError("expected token ids; use engine.tokenizer.encode(text) first")
    if hasattr(ids, "__len__") and len(ids) >= max_model_len:     # before converting them
        raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {max_model_len} "
                         "(including at least one generated token)")
    try:
        prompt = [int(i) for i in ids]
    except (TypeError, ValueError) as e:
        raise TypeError(f"prompt_token_ids must be a sequence of ints: {e}") from e
    if not prompt:
        raise ValueError("prompt_token_ids is empty")
    bad = [i for i in prompt if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(prompt) >= max_model_len:
        raise ValueError(f"prompt has {len(prompt)} tokens; max_model_len is {max_model_len} "
                         "(including at least one generated token)")
    return prompt


def check_history(conversation_id: str, token_ids: Sequence[int], vocab_size: int,
                  max_model_len: int, keep: int | None = None) -> list[int]:
    """token_ids as a conversation's token history ([] too), or ValueError naming the field;
    keep (if not None): a number of tokens, with token_ids left empty."""
    if not isinstance(conversation_id, str) or not conversation_id:
        raise ValueError(f"conversation_id must be a non-empty string, got "
                         f"{conversation_id!r:.80}")
    if keep is not None and (not isinstance(keep, int) or keep < 0 or len(token_ids)):
        raise ValueError(f"keep must be a number of tokens >= 0 (without token_ids), got "
                         f"{keep!r}")
    try:
        if isinstance(token_ids, (str, bytes)):
            raise TypeError("got text")
        ids = [int(t) for t in token_ids]
    except (TypeError, ValueError) as e:
        raise ValueError(f"token_ids must be a sequence of ints: {e}") from e
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad or len(ids) > max_model_len:
        raise ValueError(f"token_ids must be at most max_model_len ({max_model_len}) ids in "
                         f"[0, {vocab_size}); got {len(ids)}, out of range: {bad[:5]}")
    return ids


def check_sampling(params: SamplingParams, vocab_size: int, max_model_len: int,
                   explicit_max_tokens: bool = False) -> None:
    """What SamplingParams cannot check alone: ValueError naming the field. max_tokens beyond
    max_model_len only ends the turn at max_model_len ("length"), unless the caller set it
    explicitly (a server's request): then it is refused."""
    if explicit_max_tokens and params.max_tokens > max_model_len:
        raise ValueError(f"max_tokens must be <= max_model_len ({max_model_len}), got "
                         f"{params.max_tokens}")
    if params.top_k > vocab_size:
        raise ValueError(f"top_k must be in [0, {vocab_size}] (the vocabulary), got "
                         f"{params.top_k}")
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids out of range [0, {vocab_size}): {bad[:5]}")


def text_byte_limit(tokenizer, max_model_len: int) -> int | None:
    """UTF-8 bytes of the longest text that can fit in max_model_len tokens, at most: times the
    longest vocabulary entry (byte-level and SentencePiece entries spell a byte with one or
    more characters, so their UTF-8 length is never less than the bytes they stand for). None
    if the tokenizer does not expose its vocabulary."""
    get_vocab = getattr(getattr(tokenizer, "backend", None), "get_vocab", None)
    if get_vocab is None:
        return None
    vocab = get_vocab(with_added_tokens=True)
    return max_model_len * max((len(t.encode("utf-8")) for t in vocab), default=1)


def check_text_bytes(nbytes: int, limit: int | None, field: str, max_model_len: int) -> None:
    """A text of nbytes UTF-8 bytes that cannot fit in max_model_len tokens (limit: bytes of the
    longest prompt there can be) is refused before it is tokenized."""
    if limit is not None and nbytes > limit:
        raise ValueError(f"{field} is {nbytes} bytes: more than any prompt of max_model_len "
                         f"{max_model_len} tokens can hold ({limit} bytes)")
