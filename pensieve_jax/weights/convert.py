"""Convert a model source once and save it with orbax: `python -m pensieve_jax.weights.convert
SOURCE OUT_DIR [--dtype bfloat16]`. Later, `Engine.from_pretrained(OUT_DIR)` restores it."""

from __future__ import annotations

import argparse
import time

from pensieve_jax.weights import load_model
from pensieve_jax.weights.checkpoint import save_converted


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("source")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    start = time.perf_counter()
    model = load_model(args.source, args.dtype, cache_dir=False)
    path = save_converted(args.out_dir, model.config, model.params, model.tokenizer, args.dtype,
                          source=model.source)
    print(f"converted {model.source} ({args.dtype}) to {path} in "
          f"{time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
