"""Engine throughput: prefill and decode tokens/s, and stateful vs stateless on a multi-turn
workload, side by side in one run (ratios are what to compare on a noisy machine).

    python benchmarks/bench_engine.py --model smollm2-135m-instruct --conversations 8 --turns 4 \
        --out benchmarks/results/bench_engine_cpu.json

The multi-turn workload: every conversation is a closed-loop user with no think time; each turn
adds `--new-tokens` random token ids (drawn around the ShareGPT mean of ~38) and asks for
`--max-tokens` answer tokens (ignore_eos, so both policies generate the same amount).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from closed_loop import run_users
from common import environment, model_and_vocab, write_json
from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.engine.sampling import SamplingParams


def phase_prefill(engine: Engine, n: int, length: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(0, vocab, length)) for _ in range(n)]
    start = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))
    dt = time.perf_counter() - start
    return {"prompts": n, "prompt_len": length, "seconds": dt, "prefill_tokens_per_s": n * length / dt}


def phase_decode(engine: Engine, n: int, tokens: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(0, vocab, 8)) for _ in range(n)]
    start = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=tokens, ignore_eos=True))
    dt = time.perf_counter() - start
    return {"seqs": n, "tokens_each": tokens, "seconds": dt, "decode_tokens_per_s": n * tokens / dt}


def phase_multiturn(engine: Engine, args, vocab: int, token_seed: int, tag: str) -> dict:
    """The same turn lengths every call (so a warm-up pass compiles the same shapes), fresh
    token ids per token_seed (so a timed pass never hits the warm-up pass's cache)."""
    lengths = np.random.default_rng(3).normal(args.new_tokens, 8, (args.conversations, args.turns))
    rng = np.random.default_rng(token_seed)
    turns = [[list(rng.integers(0, vocab, max(4, int(n)))) for n in row] for row in lengths]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    ttft = [[] for _ in range(args.turns)]
    outputs = {}

    def user(i: int) -> None:
        seq, outs = [], []
        for k, new in enumerate(turns[i]):
            seq = seq + new
            out = engine.submit(seq, params, conversation_id=f"{tag}-{i}").result()
            ttft[k].append(out.usage.ttft_s)
            seq = seq + list(out.token_ids)
            outs.append(out.token_ids)
        outputs[i] = outs

    before = engine.stats()
    dt = run_users(user, args.conversations)
    after = engine.stats()
    delta = {k: after[k] - before[k] for k in ("cached_tokens", "prefilled_tokens",
                                                "recomputed_tokens", "completion_tokens", "steps",
                                                "step_tokens")}
    return {"seconds": dt, "requests": args.conversations * args.turns,
            "requests_per_s": args.conversations * args.turns / dt,
            "output_tokens_per_s": delta["completion_tokens"] / dt,
            "mean_ttft_by_turn_s": [float(np.mean(t)) for t in ttft], **delta,
            "_outputs": outputs}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=38)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batched-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--warmup-passes", type=int, default=4)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    model, vocab = model_and_vocab(args.model, args.dtype)
    result = {**environment(argv, __file__), "model": model.source, "dtype": args.dtype,
              "workload": {k: getattr(args, k) for k in ("conversations", "turns", "new_tokens",
                                                         "max_tokens")}}
    outputs = {}
    for policy in ("stateful", "stateless"):
        engine = Engine(model, args.dtype, EngineConfig(
            max_model_len=args.max_model_len, max_batched_tokens=args.max_batched_tokens,
            max_num_seqs=max(8, args.conversations), cache_policy=policy))
        # Warm-up passes with fresh token ids (no cache hits between passes) until a pass
        # compiles nothing new (batch composition varies with thread timing), then time.
        row = {}
        phases = {
            "prefill": lambda seed: phase_prefill(engine, 4, 256, vocab, seed),
            "decode": lambda seed: phase_decode(engine, args.conversations, args.max_tokens,
                                                vocab, seed),
            "multiturn": lambda seed: phase_multiturn(engine, args, vocab, seed, f"s{seed}"),
        }
        seed = 100
        for timed_seed, (name, phase) in enumerate(phases.items()):
            for _ in range(args.warmup_passes):
                compiled = engine.stats()["compilations"]
                phase(seed := seed + 1)
                if engine.stats()["compilations"] == compiled:
                    break
            compiled = engine.stats()["compilations"]
            row[name] = phase(timed_seed)        # the same ids for both policies
            row[name]["compilations_while_timed"] = engine.stats()["compilations"] - compiled
        row["compilations"] = engine.stats()["compilations"]
        outputs[policy] = row["multiturn"].pop("_outputs")
        engine.shutdown()
        result[policy] = row
        m = row["multiturn"]
        print(f"{policy:9s} prefill {row['prefill']['prefill_tokens_per_s']:8.1f} tok/s | "
              f"decode x{args.conversations} {row['decode']['decode_tokens_per_s']:7.1f} tok/s | "
              f"multi-turn {m['requests_per_s']:.2f} req/s, {m['output_tokens_per_s']:.1f} out "
              f"tok/s, cached {m['cached_tokens']} / prefilled {m['prefilled_tokens']} / "
              f"recomputed {m['recomputed_tokens']}, TTFT by turn "
              f"{[round(x, 3) for x in m['mean_ttft_by_turn_s']]}")
    ratio = result["stateful"]["multiturn"]["requests_per_s"] / \
        result["stateless"]["multiturn"]["requests_per_s"]
    result["stateful_over_stateless_throughput"] = ratio
    result["same_outputs"] = outputs["stateful"] == outputs["stateless"]
    print(f"stateful / stateless multi-turn throughput: {ratio:.2f}x; "
          f"identical outputs: {result['same_outputs']}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
