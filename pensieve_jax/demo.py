"""The README's main command: load the default model and hold a three-turn chat.

    python -m pensieve_jax.demo [--model SOURCE] [--dtype float32] [--max-tokens N]

The engine keeps the conversation's KV cache between turns, so each turn after the first
prefills only its new tokens (see the cached/prefilled counts printed per turn).
"""

from __future__ import annotations

import argparse
import time

from pensieve_jax.engine.engine import Engine
from pensieve_jax.engine.sampling import SamplingParams
from pensieve_jax.weights import DEFAULT_MODEL

TURNS = (
    "Hi! What is the capital of France?",
    "What is a famous landmark there?",
    "Give me one tip for visiting it.",
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    engine = Engine.from_pretrained(args.model, dtype=args.dtype)
    print(f"loaded {engine.model.config.name} ({args.dtype}) in {time.perf_counter() - start:.1f}s\n")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    session = engine.session()
    for text in TURNS:
        print(f"user:      {text}\nassistant: ", end="", flush=True)
        for piece in session.stream(text, params):
            print(piece, end="", flush=True)
        u = session.last_reply.usage
        print(f"\n           [{u.prompt_tokens} prompt tokens: {u.cached_tokens} cached, "
              f"{u.prefilled_tokens} prefilled; {u.completion_tokens} generated; "
              f"first token {u.ttft_s:.2f}s, total {u.total_s:.1f}s]\n")
    session.close()
    print("stats:", engine.stats())
    engine.shutdown()


if __name__ == "__main__":
    main()
