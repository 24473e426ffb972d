"""What one turn produced, and the turn runner every target's text mode shares.

A target's conversation(key, system_ids, system_text) returns an object with
turn(new_ids, text, max_tokens) -> TurnResult and close()."""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class TurnRecord:
    conversation: int            # index in the workload
    turn: int                    # turn index in its conversation (0 = first)
    submit_s: float              # seconds since the pass started
    ttft_s: float                # client side: submit -> first generated token
    e2e_s: float                 # client side: submit -> whole answer
    completion_tokens: int
    usage: dict[str, float]      # the server's usage (engine Usage fields; peer: the same keys)

    @property
    def finish_s(self) -> float:
        return self.submit_s + self.e2e_s

    @property
    def normalized_latency(self) -> float:
        return self.e2e_s / max(1, self.completion_tokens)


class TurnResult(dict):
    """token_ids (generated), usage (dict), ttft_s, e2e_s, text (text mode)."""


def usage_dict(usage) -> dict[str, float]:
    """The numeric fields of a Usage (dataclass or mapping)."""
    d = dataclasses.asdict(usage) if dataclasses.is_dataclass(usage) else dict(usage)
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


class SessionConversation:
    """Text mode over a chat session (engine.session() or a gRPC RemoteSession: the same
    stream / last_reply / close): the dataset's user message through the chat template, the
    model's own reply, stopping at its end of turn."""

    def __init__(self, session):
        self.session = session

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int) -> TurnResult:
        from pensieve_jax import SamplingParams   # (every layout exports it)
        params = SamplingParams(max_tokens=max_tokens)
        start = time.perf_counter()
        first = None
        for piece in self.session.stream(text, params):
            if first is None and piece:
                first = time.perf_counter()
        end = time.perf_counter()
        reply = self.session.last_reply
        return TurnResult(token_ids=list(reply.token_ids), usage=usage_dict(reply.usage),
                          ttft_s=(first or end) - start, e2e_s=end - start, text=reply.text)

    def close(self) -> None:
        self.session.close()
