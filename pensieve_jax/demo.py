"""The README's main command: load the default model and hold a three-turn chat.

    python -m pensieve_jax.demo [--model SOURCE] [--dtype float32] [--max-tokens N]

This foundation demo re-sends the whole history each turn (the stateless baseline); the stateful
engine keeps each conversation's KV cache between turns instead.
"""

from __future__ import annotations

import argparse
import time

from pensieve_jax.engine import Engine
from pensieve_jax.sampling import SamplingParams
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
    messages = []
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        prompt = engine.tokenizer.apply_chat_template(messages)
        start = time.perf_counter()
        out = engine.generate(prompt, params)
        reply = engine.tokenizer.decode(out, skip_special_tokens=True).strip()
        elapsed = time.perf_counter() - start
        messages.append({"role": "assistant", "content": reply})
        print(f"user:      {text}\nassistant: {reply}")
        print(f"           [{len(prompt)} prompt tokens, {len(out)} generated, {elapsed:.1f}s]\n")
    print("stats:", engine.stats())


if __name__ == "__main__":
    main()
