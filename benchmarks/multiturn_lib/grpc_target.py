"""A Pensieve gRPC server as a replay target (serving.client): an engine behind an in-process
server (--via grpc) or a running one (--target)."""

from __future__ import annotations

import time
from typing import Any

from .turns import SessionConversation, TurnResult, usage_dict


class GrpcTarget:
    """A Pensieve gRPC server (serving.client). Token mode sends the conversation's ids with
    Generate (no conversation id: the server adopts the cached conversation that shares the
    prefix, as for any stateless client); text mode uses a RemoteSession (Chat)."""

    kind = "grpc"

    def __init__(self, address: str, vocab_size: int, text: bool = False,
                 timeout: float | None = None):
        from serving.client import connect
        self.client = connect(address, timeout=timeout).wait_ready(30)
        self.address = address
        self.text = text
        self.vocab_size = vocab_size

    def compilations(self) -> int:
        return int(self.stats().get("compilations", 0))

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    def conversation(self, key: str, system_ids: list[int], system_text: str | None):
        if self.text:
            return SessionConversation(self.client.session(system=system_text))
        return _GrpcTokenConversation(self.client, system_ids)


class _GrpcTokenConversation:
    def __init__(self, client, system_ids: list[int]):
        self.client = client
        self.seq: list[int] = list(system_ids)
        self.conversation_id: str | None = None

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int) -> TurnResult:
        from pensieve_jax.engine.sampling import SamplingParams
        from serving.protocol import usage_from_proto
        self.seq = self.seq + list(new_ids)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        first, ids, last = None, [], None
        for response in self.client.generate_stream(self.seq, params):
            if first is None and response.token_ids:
                first = time.perf_counter()
            ids.extend(response.token_ids)
            last = response
        end = time.perf_counter()
        self.conversation_id = last.conversation_id or self.conversation_id
        self.seq = self.seq + ids
        return TurnResult(token_ids=ids, usage=usage_dict(usage_from_proto(last.usage)),
                          ttft_s=(first or end) - start, e2e_s=end - start)

    def close(self) -> None:
        if self.conversation_id:
            self.client.end_conversation(self.conversation_id)
