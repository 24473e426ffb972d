"""The worker's measured phases on a ready engine: `replay` (a closed-loop replay of
ShareGPT-shaped conversations: wall time, tokens/s, compilations during it, padding, memory)
and `ttft` (the time to first token of one turn of a conversation alone on the engine)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import workload as wl
from programs_lib.counters import CompileCounter, PaddingCounter, Sampler, memory, memory_fields


def engine_programs(stats: dict) -> dict | None:
    """The engine's own stats()["programs"] (issue 16's program set), None where it has none."""
    p = stats.get("programs")
    return p if isinstance(p, dict) else None


def padding(before: dict | None, after: dict | None, fallback: PaddingCounter | None
            ) -> dict[str, Any]:
    """padded / real step tokens over the replay: from stats()["programs"] where the engine has
    it, else from the PaddingCounter."""
    if after is not None and "padded_tokens" in after and "real_tokens" in after:
        padded = after["padded_tokens"] - (before or {}).get("padded_tokens", 0)
        real = after["real_tokens"] - (before or {}).get("real_tokens", 0)
        source = "engine stats"
    elif fallback is not None:
        padded, real, source = fallback.padded, fallback.real, "runner.step wrapper"
    else:
        return {"source": None}
    return {"padded_tokens": int(padded), "real_tokens": int(real),
            "padded_over_real": padded / real if real else None, "source": source}


def run_replay(engine, spec: dict, counter: CompileCounter, sampler: Sampler) -> dict:
    """The closed-loop replay of spec["sizes"]["conversations"] conversations, in_flight at
    once, spec["think_time"] between turns: its numbers and the memory after it."""
    from multiturn_lib.engine_target import EngineTarget
    from multiturn_lib.metrics import numeric_delta, summarize_pass
    from multiturn_lib.replay import replay
    s = spec["sizes"]
    convs = wl.sharegpt(s["conversations"], seed=spec["seed"], scale=s["scale"],
                        max_context=s["max_context"])
    workload = wl.schedule(convs, math.inf, spec["think_time"], spec["seed"])
    target = EngineTarget(engine, profile_steps=False)
    before = engine.stats()
    pad = None if engine_programs(before) is not None else PaddingCounter(engine)
    c0, mem0 = counter.after_ready(), memory()
    sampler.phase = "replay"
    run = replay(target, workload, token_seed=spec["seed"], tag="replay",
                 users=s["in_flight"], progress=False)
    sampler.phase = "after replay"
    after = engine.stats()
    summary = summarize_pass(run["records"], run["wall_s"])
    delta = numeric_delta(before, after)
    tokens = summary["tokens"]
    wall = run["wall_s"]
    return {
        "workload": workload.summary(), "wall_s": wall,
        "turns": len(run["records"]),
        "output_tokens_per_s": tokens.get("completion_tokens", 0) / wall,
        "step_tokens_per_s": delta.get("step_tokens", 0) / wall,   # real tokens the model ran
        "requests_per_s": len(run["records"]) / wall,
        "ttft_s": summary["whole_run"]["ttft_s"],
        "e2e_latency_s": summary["whole_run"]["e2e_latency_s"],
        "tokens": tokens, "engine_delta": delta,
        "compilations_during": counter.after_ready() - c0,
        "compilations_during_by_engine": delta.get("compilations"),
        "padding": padding(engine_programs(before), engine_programs(after), pad),
        "memory_before": mem0, "memory_after": memory_fields(sampler.sample()),
    }


def run_ttft(engine, spec: dict, counter: CompileCounter, sampler: Sampler) -> dict:
    """Turn `ttft_turns` of a conversation alone on the engine: one untimed conversation (its
    numbers are kept as `first_conversation`), then ttft_repeats timed ones; new random ids each
    (no cache shared between them)."""
    import numpy as np
    from multiturn_lib.engine_target import EngineTarget
    s = spec["sizes"]
    target = EngineTarget(engine, profile_steps=False)
    rng = np.random.default_rng(spec["seed"] + 16)
    sampler.phase = "ttft"
    convs = []
    for rep in range(1 + s["ttft_repeats"]):
        c0 = counter.after_ready()
        conv = target.conversation(f"ttft-{rep}", [], None)
        ttfts = []
        try:
            for turn in range(s["ttft_turns"]):
                if turn and spec.get("ttft_think_time"):
                    time.sleep(spec["ttft_think_time"])     # the user reads the reply
                ids = rng.integers(0, target.vocab_size, s["ttft_user_tokens"]).tolist()
                res = conv.turn(ids, None, s["ttft_reply_tokens"])
                ttfts.append(res["ttft_s"])
        finally:
            conv.close()
        convs.append({"ttft_by_turn_s": ttfts, "compilations": counter.after_ready() - c0})
    timed = convs[1:]
    last = [c["ttft_by_turn_s"][-1] for c in timed]
    return {"turn": s["ttft_turns"], "user_tokens": s["ttft_user_tokens"],
            "reply_tokens": s["ttft_reply_tokens"],
            "context_tokens_at_turn": (s["ttft_turns"] - 1) * (s["ttft_user_tokens"]
                                                              + s["ttft_reply_tokens"])
            + s["ttft_user_tokens"],
            "median_s": statistics.median(last) if last else None, "repeats_s": last,
            "first_conversation_s": convs[0]["ttft_by_turn_s"][-1],
            "compilations_while_timed": sum(c["compilations"] for c in timed),
            "conversations": convs}


PHASES = (("replay", run_replay), ("ttft", run_ttft))    # in the order a worker runs them
