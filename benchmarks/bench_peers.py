"""Pensieve against llama.cpp on the same weights, in one run (issue 18's table).

    python benchmarks/bench_peers.py --out benchmarks/results/bench_peers_smollm2_cpu.json
    python benchmarks/bench_peers.py --smoke --out /tmp/peers_smoke.json     # seconds

Workloads (token ids drawn at random, the same ids for both systems in each repeat):
  decode_b1       decode at batch 1: a 16-token prompt, 128 greedy tokens; tok/s between the
                  first and the last token
  prefill_512     a 512-token prompt, one token out; prompt tokens / time to first token
  conversation_8  one conversation of 8 turns (60 user + 32 reply tokens each): total seconds,
                  time to first token per turn (ttft_turn8: the 8th turn's)
  conversations_8x4  8 conversations x 4 turns (60 + 32 tokens), 4 in flight (closed-loop
                  users, no think time): generated tok/s

Systems:
  pensieve   the engine (pensieve_jax.engine.engine.Engine, default EngineConfig) on the model in
             float32, greedy, its step programs compiled before anything is timed; turns go
             through engine.submit under a conversation id (the kept cache), as in
             multiturn_lib.
  llama.cpp  llama-cpp-python (the optional `peers` extra: pip install -e ".[peers]", a CPU
             build compiled from source) on an all-F32 GGUF written from the weights our loader
             produced (peers/f32_gguf.py: the same f32 numbers, checked bit for bit against the
             loader's dequantization of the original file), served as llama.cpp's server does:
             one KV sequence per conversation kept between turns, 4 slots with continuous
             batching, --llama-threads threads (2: the machine's cores), f32 KV cache (llama.cpp's
             default is f16; --llama-kv-type), flash attention left to llama.cpp (auto).
             Without llama-cpp-python the peer is skipped and the JSON says so.

Systems alternate (A B A B, --order abba for A B B A) within every repeat, each workload once
per system per repeat; medians over --repeats, ratios Pensieve / llama.cpp (for tok/s higher
is better, for seconds lower). Greedy tokens of both systems are compared (the first
divergence is reported: f32 sums in another order can flip a near-tie late in a long run).
Around every measurement: os.getloadavg() and the CPUs other processes used (/proc/stat);
`quietest` gives each system's value from its repeat with the least other load. llama.cpp's
OpenMP threads spin at barriers and collapse when other work takes a core (decode 56 -> under
8 tok/s here): the JSON warns, and --llama-omp-wait passive makes them sleep instead.
The machine's memory bandwidth (NumPy, best of N, at the start and the end) gives the decode
floor: bytes of weights read per token / bandwidth; decode at batch 1 is reported as a
percentage of it.

--smoke: random:tiny, tiny workloads, one repeat (the test; llama.cpp too when it is installed,
on a GGUF of the random weights with a no_vocab tokenizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

import workload as wl
from common import environment, write_json
from peers import llama_cpp_peer
from peers.machine import Load, memory_bandwidth

PENSIEVE, LLAMA = "pensieve", "llama.cpp"


# -- workloads --------------------------------------------------------------------------------

def _random_ids(vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _conversations(name: str, n: int, turns: int, user: int, reply: int) -> wl.Workload:
    convs = [wl.Conversation(f"{name}-{i}", tuple(wl.Turn(user, reply) for _ in range(turns)))
             for i in range(n)]
    return wl.schedule(convs, rate=math.inf, think_time_s=0.0, seed=0, name=name)


class Workloads:
    """The four workloads at a size (full, or --smoke's)."""

    def __init__(self, smoke: bool):
        if smoke:
            self.decode_prompt, self.decode_tokens, self.prefill_len = 8, 8, 32
            self.conv = _conversations("conv", 1, 3, 8, 4)
            self.many, self.in_flight = _conversations("many", 3, 2, 8, 4), 2
        else:
            self.decode_prompt, self.decode_tokens, self.prefill_len = 16, 128, 512
            self.conv = _conversations("conv", 1, 8, 60, 32)
            self.many, self.in_flight = _conversations("many", 8, 4, 60, 32), 4
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
            prompt = _random_ids(target.vocab_size, self.decode_prompt, seed)
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
            prompt = _random_ids(target.vocab_size, self.prefill_len, seed)
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


# -- systems ------------------------------------------------------------------------------------

def build_pensieve(args, model) -> tuple[Any, dict]:
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
    return llama_cpp_peer.LlamaCppTarget(llm, vocab), info


# -- comparison -----------------------------------------------------------------------------

def first_divergence(a: list[list[int]], b: list[list[int]]) -> dict | None:
    """Where two systems' token lists (one per turn) first differ; None if identical."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            i = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return {"turn_index": k, "token_index": i,
                    PENSIEVE: x[i] if i < len(x) else None, LLAMA: y[i] if i < len(y) else None,
                    "tokens_in_turn": [len(x), len(y)]}
    if len(a) != len(b):
        return {"turn_index": min(len(a), len(b)), "token_index": 0, "turns": [len(a), len(b)]}
    return None


def divergence_prefix(prompts: list, tokens: list[list[int]], turn: int, index: int
                      ) -> list[int]:
    """The token sequence both systems had seen when they first chose differently: the
    conversation's earlier turns (user ids + reply) and this turn's ids + the reply so far."""
    conv = prompts[turn][0]
    seq: list[int] = []
    for j in range(turn):
        if prompts[j][0] == conv:
            seq += list(prompts[j][1]) + list(tokens[j])
    return seq + list(prompts[turn][1]) + list(tokens[turn][:index])


def near_tie(llm, seq: list[int], ours: int | None, theirs: int | None) -> dict[str, Any]:
    """llama.cpp's logits at a divergence, recomputed over the whole prefix in one pass (the
    run itself reached it turn by turn, in other batches, so its own sums differ a little):
    both candidates' logits, their gap and the top 3. A gap of a few 1e-3 is a near-tie that
    f32 summation order decides."""
    if ours is None or theirs is None:
        return {}
    logits = llm.logits(seq)
    top = np.argsort(logits)[::-1][:3]
    return {"context_tokens": len(seq),
            "llama_cpp_logit_of": {PENSIEVE: float(logits[ours]), LLAMA: float(logits[theirs])},
            "logit_gap": float(logits[theirs] - logits[ours]),
            "llama_cpp_top3": [[int(t), float(logits[t])] for t in top]}


def weights_bytes(model) -> int:
    """Bytes of parameters a decode step reads once: every tensor (a tied embedding counted
    once, as the output projection; the embedding lookup reads one row)."""
    import jax
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params)))


def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def summarize(names: list[str], runs: dict, systems: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        row: dict[str, Any] = {}
        for s in systems:
            rs = runs[name][s]
            row[s] = {"median": _median([r["value"] for r in rs]),
                      "values": [r["value"] for r in rs]}
            if name == "conversation_8":
                per_turn = list(zip(*[r["ttft_by_turn_s"] for r in rs]))
                row[s]["ttft_by_turn_s"] = [_median(list(t)) for t in per_turn]
                row[s]["ttft_last_turn_s"] = row[s]["ttft_by_turn_s"][-1]
            if name == "conversations_8x4":
                per_turn = list(zip(*[r["mean_ttft_by_turn_s"] for r in rs]))
                row[s]["mean_ttft_by_turn_s"] = [_median(list(t)) for t in per_turn]
        if LLAMA in systems:
            p, q = row[PENSIEVE]["median"], row[LLAMA]["median"]
            row["ratio_pensieve_over_llama_cpp"] = p / q if p and q else None
            if name == "conversation_8":
                a, b = row[PENSIEVE]["ttft_last_turn_s"], row[LLAMA]["ttft_last_turn_s"]
                row["ttft_last_turn_ratio"] = a / b if a and b else None
            divs = []
            for k, (x, y) in enumerate(zip(runs[name][PENSIEVE], runs[name][LLAMA])):
                d = first_divergence(x["tokens"], y["tokens"])
                if d is not None:
                    divs.append({"repeat": k, **d})
            row["tokens_match"] = not divs
            row["token_divergences"] = divs
        out[name] = row
    return out


HIGHER_IS_BETTER = {"decode_b1": True, "prefill_512": True, "conversation_8": False,
                    "conversations_8x4": True}


def add_quietest(summary: dict, runs: dict, systems: list[str]) -> None:
    """Per workload and system, beside the median: `quietest`, the value measured while other
    processes used the least CPU (others_cpus; ties: the better value), with that load; and
    `best`. With `quietest_ratio_pensieve_over_llama_cpp`. `runs` as in the results JSON
    (value and load per measurement)."""
    for name, row in summary.items():
        higher = HIGHER_IS_BETTER.get(name, True)
        for s in systems:
            ms = [m for m in runs[name][s] if m.get("value") is not None]
            if not ms:
                continue
            key = lambda m: (m["load"].get("others_cpus", math.inf),
                             -m["value"] if higher else m["value"])
            q = min(ms, key=key)
            row[s]["quietest"] = {"value": q["value"], "others_cpus": q["load"].get("others_cpus"),
                                  "loadavg_before": q["load"].get("loadavg_before")}
            if name == "conversation_8":
                row[s]["quietest"]["ttft_last_turn_s"] = q.get("ttft_last_turn_s")
            vals = [m["value"] for m in ms]
            row[s]["best"] = max(vals) if higher else min(vals)
        if LLAMA in systems and "quietest" in row.get(LLAMA, {}) and "quietest" in row[PENSIEVE]:
            row["quietest_ratio_pensieve_over_llama_cpp"] = \
                row[PENSIEVE]["quietest"]["value"] / row[LLAMA]["quietest"]["value"]


def print_table(summary: dict, systems: list[str], bandwidth: dict, floor: dict) -> None:
    labels = {"decode_b1": "decode at batch 1, tok/s",
              "prefill_512": "prefill of a 512-token prompt, tok/s",
              "conversation_8": "one conversation, 8 turns, total s",
              "conversations_8x4": "8 conversations x 4 turns, 4 in flight, tok/s"}
    head = f"{'workload':48s}" + "".join(f"{s:>12s}" for s in systems)
    if LLAMA in systems:
        head += f"{'P / L':>8s}  tokens"
    print(head)

    def line(label, vals, ratio=None, match=None):
        s = f"{label:48s}" + "".join(f"{v:12.3f}" if v is not None else f"{'-':>12s}"
                                     for v in vals)
        if ratio is not None:
            s += f"{ratio:8.2f}"
        if match is not None:
            s += "  " + ("same" if match else "DIFFER")
        print(s)
    for name, row in summary.items():
        line(labels.get(name, name), [row[s]["median"] for s in systems],
             row.get("ratio_pensieve_over_llama_cpp"), row.get("tokens_match"))
        if name == "conversation_8":
            line("time to first token at the last turn, s",
                 [row[s]["ttft_last_turn_s"] for s in systems], row.get("ttft_last_turn_ratio"))
    print("the same, each system's quietest repeat (least CPU used by other processes):")
    for name, row in summary.items():
        if all("quietest" in row[s] for s in systems):
            line("  " + labels.get(name, name), [row[s]["quietest"]["value"] for s in systems],
                 row.get("quietest_ratio_pensieve_over_llama_cpp"))
            print(f"{'':50s}other processes: " + ", ".join(
                f"{s} {row[s]['quietest']['others_cpus']} cpus" for s in systems))
    print(f"memory bandwidth (read) {floor['bandwidth_gbs']:.1f} GB/s; weights "
          f"{floor['weights_bytes'] / 1e6:.0f} MB per token; floor {floor['floor_tok_s']:.1f} "
          f"tok/s; decode at batch 1: " + ", ".join(
              f"{s} {floor['decode_percent_of_floor'][s]:.0f}%" for s in systems
              if floor["decode_percent_of_floor"].get(s) is not None))


# -- main -----------------------------------------------------------------------------------

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="default smollm2-135m-instruct "
                    "(random:tiny with --smoke)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --smoke)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed passes of every workload per system before the repeats "
                         "(default 1; 0 with --smoke)")
    ap.add_argument("--order", choices=("abab", "abba"), default="abab",
                    help="abab: Pensieve first in every repeat; abba: alternate who goes first")
    ap.add_argument("--workloads", nargs="+", default=None,
                    help="a subset of decode_b1 prefill_512 conversation_8 conversations_8x4")
    ap.add_argument("--no-peer", action="store_true", help="Pensieve only")
    ap.add_argument("--llama-threads", type=int, default=2)
    ap.add_argument("--llama-slots", type=int, default=4,
                    help="KV sequences (server slots) of the llama.cpp context")
    ap.add_argument("--llama-ctx", type=int, default=2048, help="tokens per slot")
    ap.add_argument("--llama-batch", type=int, default=512, help="n_batch = n_ubatch")
    ap.add_argument("--llama-kv-type", choices=tuple(llama_cpp_peer.KV_TYPES), default="f32")
    ap.add_argument("--llama-flash-attn", choices=tuple(llama_cpp_peer.FLASH_ATTN),
                    default="auto")
    ap.add_argument("--llama-omp-wait", choices=("default", "passive", "active"),
                    default="default", help="OMP_WAIT_POLICY for llama.cpp's OpenMP threads "
                    "(default: libgomp's own, spinning at barriers; on a CPU shared with other "
                    "work a preempted spinner stalls whole steps: passive sleeps instead)")
    ap.add_argument("--gguf-out", help="keep the F32 GGUF here (default: a temporary file)")
    ap.add_argument("--no-weight-check", action="store_true",
                    help="skip comparing the written GGUF with the original bit for bit")
    ap.add_argument("--bandwidth-mib", type=int, default=None, help="default 1024 (64 smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny and fast (the test)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")     # a CPU comparison: llama.cpp's CPU build
    if args.llama_omp_wait != "default":              # read when libgomp loads (llama_cpp import)
        os.environ["OMP_WAIT_POLICY"] = args.llama_omp_wait.upper()
    model_name = args.model or ("random:tiny" if args.smoke else "smollm2-135m-instruct")
    repeats = args.repeats or (1 if args.smoke else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 1)

    from pensieve_jax.weights import _EMBEDDED, embedded_model_path, load_model
    source_gguf = None
    if model_name in _EMBEDDED:
        source_gguf = embedded_model_path(model_name)
    elif model_name.endswith(".gguf"):
        source_gguf = model_name
    model = load_model(model_name, args.dtype)
    result: dict[str, Any] = {**environment(argv, __file__), "model": model.source,
                              "dtype": args.dtype, "smoke": args.smoke, "repeats": repeats,
                              "order": args.order, "warmup_passes": warmup}
    works = Workloads(args.smoke)
    names = args.workloads or works.names
    unknown = set(names) - set(works.names)
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}")
    result["workloads"] = {n: works.describe()[n] for n in names}

    def measure_bandwidth() -> dict:
        with Load() as load:
            out = memory_bandwidth(args.bandwidth_mib or (64 if args.smoke else 1024),
                                   repeats=3 if args.smoke else 5)
        out["load"] = load.record
        return out

    print("measuring memory bandwidth...", flush=True)
    result["memory_bandwidth"] = bw = measure_bandwidth()

    targets: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as workdir:
        if args.no_peer:
            result["peer"] = {"available": False, "skipped": "--no-peer"}
        else:
            print("writing the F32 GGUF and loading llama.cpp...", flush=True)
            peer, result["peer"] = build_llama(args, model, source_gguf, workdir)
            if peer is not None:
                targets[LLAMA] = peer
            else:
                print("llama.cpp peer skipped:", result["peer"]["skipped"], flush=True)
        print("starting the engine (compiling its step programs)...", flush=True)
        targets[PENSIEVE], result["pensieve"] = build_pensieve(args, model)
        systems = [PENSIEVE] + ([LLAMA] if LLAMA in targets else [])
        compiled_at_start = targets[PENSIEVE].compilations()

        for w in range(warmup):
            for name in names:
                for s in systems:
                    start = time.perf_counter()
                    works.run(name, targets[s], seed=90_000 + 100 * w + names.index(name),
                              tag=f"warm{w}-{s}")
                    print(f"warm-up {w} {name:18s} {s:9s} {time.perf_counter() - start:8.1f} s",
                          flush=True)
        runs: dict[str, dict[str, list]] = {n: {s: [] for s in systems} for n in names}
        measurements = []
        for r in range(repeats):
            order = systems if args.order == "abab" or r % 2 == 0 else systems[::-1]
            for name in names:
                seed = 1000 * (r + 1) + names.index(name)        # the same ids for both
                for s in order:
                    with Load() as load:
                        m = works.run(name, targets[s], seed=seed, tag=f"r{r}-{s}")
                    m["load"] = load.record
                    runs[name][s].append(m)
                    measurements.append({"repeat": r, "workload": name, "system": s,
                                         "value": m["value"], **load.record})
                    print(f"repeat {r} {name:18s} {s:9s} {m['value']:10.3f}  load "
                          f"{load.record['loadavg_before'][0] if load.record['loadavg_before'] else '?'}"
                          f" others {load.record.get('others_cpus', '?')} cpus", flush=True)
        result["pensieve"]["compilations_after_ready"] = \
            targets[PENSIEVE].compilations() - compiled_at_start
        targets[PENSIEVE].engine.close()
        summary = summarize(names, runs, systems)
        add_quietest(summary, {n: {s: [{"value": m["value"], "load": m["load"],
                                         "ttft_last_turn_s": m.get("ttft_last_turn_s")}
                                        for m in runs[n][s]] for s in systems} for n in names},
                     systems)
        if LLAMA in targets:
            targets[LLAMA].shutdown()
            for name in names:                 # how close a call each divergence was
                for d in summary[name].get("token_divergences", []):
                    m = runs[name][PENSIEVE][d["repeat"]]
                    seq = divergence_prefix(m["prompts"], m["tokens"], d["turn_index"],
                                            d["token_index"])
                    d.update(near_tie(targets[LLAMA].llm, seq, d.get(PENSIEVE), d.get(LLAMA)))
            targets[LLAMA].llm.close()

    print("measuring memory bandwidth again...", flush=True)
    result["memory_bandwidth_end"] = bw_end = measure_bandwidth()
    bandwidth = max(bw["read_gbs"], bw_end["read_gbs"])
    nbytes = weights_bytes(model)
    floor_tok_s = bandwidth * 1e9 / nbytes
    decode = summary.get("decode_b1", {})

    def percent(value):
        return 100 * value / floor_tok_s if value else None
    floor = {"weights_bytes": nbytes, "bandwidth_gbs": bandwidth,
             "floor_tok_s": floor_tok_s,
             "decode_percent_of_floor": {s: percent(decode.get(s, {}).get("median"))
                                         for s in systems},
             "decode_percent_of_floor_quietest": {
                 s: percent(decode.get(s, {}).get("quietest", {}).get("value"))
                 for s in systems},
             "note": "floor = read bandwidth (the better of the measurements at the start and "
                     "the end of the run) / bytes of weights read per token (all f32 "
                     "parameters once; KV reads, a few MB at these contexts, not counted). "
                     "Measured on a busy machine the bandwidth is low, and a decode measured "
                     "at a quieter moment can exceed 100%."}
    result.update({"systems": systems, "summary": summary, "decode_floor": floor,
                   "tokens_match": all(row.get("tokens_match", True) for row in summary.values())
                   if LLAMA in systems else None,
                   "measurements": measurements,
                   "runs": {n: {s: [{k: v for k, v in m.items() if k not in ("tokens", "prompts")}
                                    for m in runs[n][s]] for s in systems} for n in names}})
    busy = [m for m in measurements if m["system"] == LLAMA and (m.get("others_cpus") or 0) > 0.3]
    if busy and args.llama_omp_wait == "default":
        result["llama_cpp_contention_warning"] = (
            f"{len(busy)} of the llama.cpp measurements ran while other processes used more "
            f"than 0.3 CPUs: llama.cpp's OpenMP threads spin at barriers, and with both cores "
            f"taken one of them is preempted and every barrier waits for it (decode fell from "
            f"56 to 0.4-8 tok/s on this 2-core box). Rerun on a quiet machine, or with "
            f"--llama-omp-wait passive")
        print("warning:", result["llama_cpp_contention_warning"])
    print_table(summary, systems, bw, floor)
    if LLAMA in systems:
        print("greedy tokens identical:", result["tokens_match"])
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
