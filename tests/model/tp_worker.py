"""Run by tests/model/test_parallel.py in a subprocess with XLA_FLAGS forcing 4 CPU devices.

    python tests/tp_worker.py SCENARIO:ATTENTION:TP[,TP...] ...

Prints one JSON line: {"SCENARIO:ATTENTION": {tp: {"outputs", "stats", "layout"}}}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from pensieve_jax.model.config import ModelConfig  # noqa: E402
from pensieve_jax.engine.engine import Engine, EngineConfig  # noqa: E402
from pensieve_jax.engine.sampling import SamplingParams  # noqa: E402
from pensieve_jax.tokenizer import Tokenizer  # noqa: E402
from pensieve_jax.weights import LoadedModel, load_model, random_params  # noqa: E402

# 8 query heads over 4 KV heads: tensor_parallel 1, 2 and 4 all split it
SMALL = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=8, num_kv_heads=4, head_dim=16, max_position_embeddings=2048,
                    name="random:tp-small")
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def small_model() -> LoadedModel:
    return LoadedModel(SMALL, random_params(SMALL, "float32", seed=1, std=0.1),
                       Tokenizer.byte_level(SMALL.vocab_size), SMALL.name)


def turns(seed: int, n: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, length).tolist() for _ in range(n)]


def converse(engine: Engine, name: str, new_turns, params=GREEDY) -> list[list[int]]:
    seq, outs = [], []
    for new in new_turns:
        seq = seq + list(new)
        out = engine.submit(seq, params, conversation_id=name).result()
        outs.append(list(out.token_ids))
        seq = seq + list(out.token_ids)
    return outs


def layout(engine: Engine) -> dict:
    r = engine.runner
    q = r.params["params"]["layers"].get("q_proj", {}).get("kernel")
    if q is None:      # one CPU device: per-layer kernels, q/k/v fused (runtime_params)
        c = engine.model.config
        fused = r.params["layer_kernels"]["qkv_proj"][0]
        q_shard = [*fused.shape[:-1], c.num_heads * c.head_dim]
    else:
        q_shard = list(q.addressable_shards[0].data.shape)
    return {"kv_shard": list(r.kv.k.addressable_shards[0].data.shape),
            "kv_devices": len(r.kv.k.sharding.device_set),
            "q_proj_shard": q_shard}


def swaps(attention: str, tp: int, swap_in: str = "next_step") -> dict:
    """Conversation A is pushed to the host tier by three others, then comes back for two more
    turns; then two conversations share a system prompt that ends inside a page (copy on
    write). All turns one after another."""
    page_bytes = 2 * SMALL.num_layers * 8 * SMALL.num_kv_heads * SMALL.head_dim * 4
    engine = Engine(small_model(), "float32", EngineConfig(
        page_size=8, num_pages=20, max_model_len=128, max_batched_tokens=32, max_num_seqs=4,
        host_cache_bytes=40 * page_bytes, swap_out_threshold=0.0, attention=attention,
        tensor_parallel=tp, swap_in=swap_in))
    a = turns(1, 3, 24)
    outputs = {"A": converse(engine, "A", a[:1])}
    for i in range(3):
        outputs[f"other-{i}"] = converse(engine, f"other-{i}", turns(10 + i, 1, 56))
    outputs["A"] += converse_from(engine, "A", a, outputs["A"])
    system = turns(3, 1, 43)[0]                  # 5 pages and 3 tokens of a sixth
    for name, seed in (("S1", 30), ("S2", 31)):
        outputs[name] = converse(engine, name, [system + turns(seed, 1, 9)[0]])
    stats = engine.stats()
    result = {"outputs": outputs, "layout": layout(engine),
              "stats": {k: stats.get(k) for k in ("device_to_host_pages", "hit_tokens",
                                                  "recomputed_tokens", "copied_on_write_pages")} |
              {"swap_in_pages": stats["swap"]["in_pages"],
               "layered_pages": stats["swap"]["in_layered_pages"],
               "host_hit_tokens": stats["hit_tokens_by_tier"]["host"]}}
    engine.shutdown()
    return result


def converse_from(engine: Engine, name: str, all_turns, first_outputs) -> list[list[int]]:
    """Turns 2.. of a conversation whose first turn (all_turns[0] -> first_outputs[0]) ran."""
    seq = list(all_turns[0]) + first_outputs[0]
    outs = []
    for new in all_turns[1:]:
        seq = seq + list(new)
        out = engine.submit(seq, GREEDY, conversation_id=name).result()
        outs.append(list(out.token_ids))
        seq = seq + list(out.token_ids)
    return outs


KERNEL_KV_HEADS: set[int] = set()     # KV heads the Pallas kernel saw when traced


def _probe_kernel():
    import pallas_kernels
    kernel = pallas_kernels.ragged_paged_attention_stacked

    def probe(q, k_pool, *args, **kw):
        KERNEL_KV_HEADS.add(int(k_pool.shape[3]))
        return kernel(q, k_pool, *args, **kw)
    pallas_kernels.ragged_paged_attention_stacked = probe


def short(attention: str, tp: int) -> dict:
    """Two conversations of two short turns, batched together (kept tiny for interpret mode)."""
    KERNEL_KV_HEADS.clear()
    engine = Engine(small_model(), "float32", EngineConfig(
        page_size=8, num_pages=16, max_model_len=64, max_batched_tokens=16, max_num_seqs=2,
        attention=attention, tensor_parallel=tp))
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    outputs = {}

    def run(name, seed):
        outputs[name] = converse(engine, name, turns(seed, 2, 9), params)
    threads = [threading.Thread(target=run, args=(n, seed)) for n, seed in (("x", 5), ("y", 6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {"outputs": outputs, "stats": {},
              "layout": layout(engine) | {"kernel_kv_heads": sorted(KERNEL_KV_HEADS)}}
    engine.shutdown()
    return result


def tiny_preset(attention: str, tp: int) -> dict:
    """random:tiny (2 KV heads): multi-turn with swaps to host at tensor_parallel 1 and 2."""
    page_bytes = 2 * 2 * 8 * 2 * 16 * 4
    engine = Engine.from_pretrained(
        "random:tiny", page_size=8, num_pages=20, max_model_len=128, max_batched_tokens=32,
        max_num_seqs=4, host_cache_bytes=40 * page_bytes, swap_out_threshold=0.0,
        attention=attention, tensor_parallel=tp)
    a = turns(2, 2, 24)
    outputs = {"A": converse(engine, "A", a[:1])}
    for i in range(3):
        outputs[f"other-{i}"] = converse(engine, f"other-{i}", turns(20 + i, 1, 56))
    outputs["A"] += converse_from(engine, "A", a, outputs["A"])
    stats = engine.stats()
    result = {"outputs": outputs, "layout": layout(engine),
              "stats": {"device_to_host_pages": stats["device_to_host_pages"],
                        "swap_in_pages": stats["swap"]["in_pages"]}}
    engine.shutdown()
    return result


def errors(attention: str, tp: int) -> dict:
    """The ValueError messages for bad tensor_parallel values (4 devices here)."""
    out = {}
    for name, make in (
            ("too_many_devices", lambda: Engine(small_model(), "float32", EngineConfig(
                num_pages=16, max_model_len=64, tensor_parallel=8))),
            ("kv_heads", lambda: Engine.from_pretrained("random:tiny", num_pages=16,
                                                        max_model_len=64, tensor_parallel=4)),
            ("heads", lambda: Engine(small_model(), "float32", EngineConfig(
                num_pages=16, max_model_len=64, tensor_parallel=3)))):
        try:
            make()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return {"outputs": out, "layout": {}, "stats": {}}


# the family features that touch sharding: q/k/v biases (column-sharded), an o_proj bias
# (replicated), per-head q/k norms, and a window the conversations run past
FAMILY = dataclasses.replace(SMALL, qkv_bias=True, o_bias=True, qk_norm=True, sliding_window=8,
                             name="random:tp-family")


def family(attention: str, tp: int) -> dict:
    """Two conversations of two turns (past the window), one after the other."""
    model = LoadedModel(FAMILY, random_params(FAMILY, "float32", seed=2, std=0.1),
                        Tokenizer.byte_level(FAMILY.vocab_size), FAMILY.name)
    engine = Engine(model, "float32", EngineConfig(
        page_size=8, num_pages=24, max_model_len=96, max_batched_tokens=16, max_num_seqs=2,
        attention=attention, tensor_parallel=tp))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    outputs = {name: converse(engine, name, turns(seed, 2, 13), params)
               for name, seed in (("f", 8), ("g", 9))}
    result = {"outputs": outputs, "stats": {}, "layout": layout(engine)}
    engine.shutdown()
    return result


def layered(attention: str, tp: int) -> dict:
    """swaps, with swap-ins loaded layer by layer inside the step (pinned host -> shards)."""
    return swaps(attention, tp, swap_in="layered")


SCENARIOS = {"swaps": swaps, "layered": layered, "short": short, "tiny": tiny_preset,
             "errors": errors, "family": family}

if __name__ == "__main__":
    _probe_kernel()
    results = {}
    for arg in sys.argv[1:]:
        scenario, attention, tps = arg.split(":")
        results[f"{scenario}:{attention}"] = {
            tp: SCENARIOS[scenario](attention, int(tp)) for tp in tps.split(",")}
    print(json.dumps(results))
