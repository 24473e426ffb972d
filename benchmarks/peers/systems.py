"""The two systems bench_peers.py compares, built from its arguments: Pensieve (the engine on
the loaded model, its step programs compiled) and llama.cpp (an all-F32 GGUF of the same
weights, served by LlamaCppTarget; None with the reason when llama-cpp-python is missing).
Each comes with what the results JSON says of it."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from peers import llama_cpp_peer
from peers.llama_cpp_target import LlamaCppTarget


def build_pensieve(args, model) -> tuple[Any, dict]:
    """The engine (default EngineConfig; tiny with --smoke), warmed up, as a target."""
    from pensieve_jax.engine.engine import Engine, EngineConfig
    from peers.pensieve_target import PensieveTarget
    options = dict(max_num_seqs=2, max_model_len=512, max_batched_tokens=64, page_size=64,
                   token_buckets=(64,)) \
        if args.smoke else {}
    config = EngineConfig(**options)
    start = time.perf_counter()
    engine = Engine(model, args.dtype, config)
    engine.warm_up()                     # a no-op when precompile already ran
    ready_s = time.perf_counter() - start
    programs = engine.stats()["programs"]
    info = {"engine_config": dataclasses.asdict(config),
            "engine_config_overrides": options, "start_s": round(ready_s, 2),
            "programs": programs.get("count"), "ready": engine.ready}
    return PensieveTarget(engine), info


def build_llama(args, model, source_gguf: str | None, workdir: str) -> tuple[Any, dict]:
    """llama.cpp on an all-F32 GGUF of the model written to workdir (or --gguf-out), as a
    target; (None, why) without llama-cpp-python."""
    from peers.f32_gguf import check_against_source, write_f32_gguf
    ok, version = llama_cpp_peer.available()
    info: dict[str, Any] = {"available": ok}
    if not ok:
        info["skipped"] = (f"llama-cpp-python is not installed ({version}); pip install -e "
                           f"'.[peers]' to compare with llama.cpp")
        return None, info
    info["llama_cpp_python"] = version
    start = time.perf_counter()
    path = args.gguf_out or os.path.join(workdir, "model-f32.gguf")
    info["gguf"] = write_f32_gguf(model, path, source_gguf)
    info["gguf"]["write_s"] = round(time.perf_counter() - start, 2)
    if source_gguf is not None and not args.no_weight_check:
        last = model.config.num_layers - 1
        info["weights_check"] = check_against_source(path, source_gguf, model.config,
                                                     layers=(0, last))
    llm = llama_cpp_peer.LlamaCpp(path, n_threads=args.llama_threads, n_seq=args.llama_slots,
                                  n_ctx_seq=args.llama_ctx, n_batch=args.llama_batch,
                                  kv_type=args.llama_kv_type, flash_attn=args.llama_flash_attn)
    info["settings"] = {**llm.settings, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    try:
        info["system_info"] = llm.L.llama_print_system_info().decode()
    except Exception:
        pass
    vocab = min(model.config.vocab_size, llm.n_vocab)
    return LlamaCppTarget(llm, vocab), info



def prefill_flops(model, tokens: int) -> float:
    """Floating-point operations of one prefill of `tokens` tokens that returns one token's
    logits: 2 per weight per token for the layers' matmuls, the causal attention's two
    products (2 x 2 x tokens^2 / 2 x heads x head_dim per layer), one row of the output
    projection."""
    import jax
    c = model.config
    layers = model.params["params"]["layers"]
    layer_weights = sum(x.size for x in jax.tree_util.tree_leaves(layers) if x.ndim == 3)
    attention = 2 * tokens ** 2 * c.num_heads * c.head_dim * c.num_layers
    return 2.0 * layer_weights * tokens + attention + 2.0 * c.vocab_size * c.hidden_size


def weights_bytes(model) -> int:
    """Bytes of parameters a decode step reads once: every tensor (a tied embedding counted
    once, as the output projection; the embedding lookup reads one row)."""
    import jax
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params)))
