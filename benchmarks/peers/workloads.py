"""bench_peers.py's four workloads (decode_b1, prefill_512, conversation_8, conversations_8x4),
at full size or --smoke's, and one measurement of one of them on a target (multiturn_lib's
target interface: Pensieve's or llama.cpp's)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import workload as wl


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    """n token ids below vocab, drawn from seed."""
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def closed_loop_conversations(name: str, n: int, turns: int, user: int, reply: int
                              ) -> wl.Workload:
    """n conversations of `turns` turns (user tokens, reply tokens each), all arriving at once,
    no think time."""
    convs = [wl.Conversation(f"{name}-{i}", tuple(wl.Turn(user, reply) for _ in range(turns)))
             for i in range(n)]
    return wl.schedule(convs, rate=math.inf, think_time_s=0.0, seed=0, name=name)


class Workloads:
    """The four workloads at a size (full, or --smoke's)."""

    def __init__(self, smoke: bool):
        if smoke:
            self.decode_prompt, self.decode_tokens, self.prefill_len = 8, 8, 32
            self.conv = closed_loop_conversations("conv", 1, 3, 8, 4)
            self.many, self.in_flight = closed_loop_conversations("many", 3, 2, 8, 4), 2
        else:
            self.decode_prompt, self.decode_tokens, self.prefill_len = 16, 128, 512
            self.conv = closed_loop_conversations("conv", 1, 8, 60, 32)
            self.many, self.in_flight = closed_loop_conversations("many", 8, 4, 60, 32), 4
        self.names = ["decode_b1", "prefill_512", "conversation_8", "conversations_8x4"]

    def describe(self) -> dict[str, Any]:
        c, m = self.conv.conversations[0], self.many.conversations[0]
        return {
            "decode_b1": {"prompt_tokens": self.decode_prompt, "new_tokens": self.decode_tokens,
                          "metric": "tok/s between first and last token (higher is better)"},
            "prefill_512": {"prompt_tokens": self.prefill_len, "new_tokens": 1,
                            "metric": "prompt tokens / time to first token (higher is better)"},
            "conversation_8": {"conversations": 1, "turns": len(c.turns),
                               "user_tokens": c.turns[0].prompt_len,
                               "reply_tokens": c.turns[0].answer_len,
                               "metric": "total seconds (lower is better); TTFT per turn"},
            "conversations_8x4": {"conversations": len(self.many), "turns": len(m.turns),
                                  "in_flight": self.in_flight,
                                  "user_tokens": m.turns[0].prompt_len,
                                  "reply_tokens": m.turns[0].answer_len,
                                  "metric": "generated tok/s over the pass (higher is better)"},
        }

    def run(self, name: str, target, seed: int, tag: str) -> dict[str, Any]:
        """One measurement of workload `name` on `target`: its numbers and its tokens."""
        from multiturn_lib.replay import replay
        if name == "decode_b1":
            conv = target.conversation(f"{tag}-decode", [], None)
            prompt = random_ids(target.vocab_size, self.decode_prompt, seed)
            try:
                res = conv.turn(prompt, None, self.decode_tokens)
            finally:
                conv.close()
            t = res["token_times"]
            span = t[-1] - t[0]
            return {"value": (len(t) - 1) / span if span > 0 else float("nan"),
                    "ttft_s": res["ttft_s"], "e2e_s": res["e2e_s"], "tokens": [res["token_ids"]],
                    "prompts": [(0, prompt)]}
        if name == "prefill_512":
            conv = target.conversation(f"{tag}-prefill", [], None)
            prompt = random_ids(target.vocab_size, self.prefill_len, seed)
            try:
                res = conv.turn(prompt, None, 1)
            finally:
                conv.close()
            return {"value": self.prefill_len / res["ttft_s"], "ttft_s": res["ttft_s"],
                    "tokens": [res["token_ids"]], "prompts": [(0, prompt)]}
        work, users = (self.conv, 1) if name == "conversation_8" else (self.many, self.in_flight)
        run = replay(target, work, token_seed=seed, tag=tag, users=users, progress=False,
                     keep_outputs=True)
        recs = run["records"]
        tokens = [t for i in sorted(run["outputs"]) for t in run["outputs"][i]]
        prompts = [(i, ids) for i in sorted(run["outputs"])       # the same order as tokens
                   for ids in wl.token_ids_for(work.conversations[i], target.vocab_size, seed,
                                               {})[1]]
        out = {"wall_s": run["wall_s"], "prompts": prompts,
               "completion_tokens": sum(r.completion_tokens for r in recs),
               "prefilled_tokens": sum(r.usage.get("prefilled_tokens", 0) for r in recs),
               "cached_tokens": sum(r.usage.get("cached_tokens", 0) for r in recs),
               "tokens": tokens}
        if name == "conversation_8":
            out["value"] = run["wall_s"]
            out["ttft_by_turn_s"] = [r.ttft_s for r in sorted(recs, key=lambda r: r.turn)]
            out["ttft_last_turn_s"] = out["ttft_by_turn_s"][-1]
        else:
            out["value"] = out["completion_tokens"] / run["wall_s"]
            by_turn: dict[int, list[float]] = {}
            for r in recs:
                by_turn.setdefault(r.turn, []).append(r.ttft_s)
            out["mean_ttft_by_turn_s"] = [float(np.mean(by_turn[k])) for k in sorted(by_turn)]
        return out
