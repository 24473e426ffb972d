"""The Pensieve engine in this process as a bench_peers target: token-level turns through
engine.submit under a conversation id (the cache is kept between turns), with the time of
every streamed token (for decode rates). The interface of multiturn_lib's targets, so
multiturn_lib.replay drives it as it drives the llama.cpp peer."""

from __future__ import annotations

import time
from typing import Any


class PensieveTarget:
    kind = "pensieve"

    def __init__(self, engine, vocab_size: int | None = None):
        self.engine = engine
        self.vocab_size = vocab_size or min(engine.model.config.vocab_size,
                                            engine.tokenizer.vocab_size)

    def compilations(self) -> int:
        return int(self.engine.stats()["compilations"])

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def conversation(self, key: str, system_ids: list[int], system_text: str | None):
        return _PensieveConversation(self.engine, key, system_ids)

    def shutdown(self) -> None:
        pass


class _PensieveConversation:
    def __init__(self, engine, key: str, system_ids: list[int]):
        self.engine, self.key = engine, key
        self.seq = list(system_ids)

    def turn(self, new_ids: list[int], text: str | None, max_tokens: int):
        from multiturn_lib.turns import TurnResult, usage_dict
        from pensieve_jax.engine.sampling import SamplingParams
        self.seq = self.seq + list(new_ids)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)   # greedy
        start = time.perf_counter()
        handle = self.engine.submit(self.seq, params, conversation_id=self.key)
        times, out = [], None
        for event in handle:
            if event.token_ids:
                now = time.perf_counter() - start
                times.extend([now] * len(event.token_ids))
            if event.output is not None:
                out = event.output
        end = time.perf_counter()
        ids = list(out.token_ids)
        self.seq = self.seq + ids
        return TurnResult(token_ids=ids, usage=usage_dict(out.usage),
                          ttft_s=times[0] if times else end - start, e2e_s=end - start,
                          token_times=times)

    def close(self) -> None:
        self.engine.end_conversation(self.key)
