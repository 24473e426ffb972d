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
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_json
# the parts: peers/ (peers/__init__.py lists them)
from peers import LLAMA, PENSIEVE, llama_cpp_peer
from peers.divergence import divergence_prefix, near_tie
from peers.machine import Load, matmul_peak, memory_bandwidth
from peers.summary import (add_quietest, prefill_floor, print_prefill_floor, print_table,
                           summarize)
from peers.systems import build_llama, build_pensieve, prefill_flops, weights_bytes
from peers.workloads import Workloads


def make_parser() -> argparse.ArgumentParser:
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
    return ap


def measure_bandwidth(args) -> dict:
    """The machine's memory bandwidth (peers.machine), with the load around the measurement."""
    with Load() as load:
        out = memory_bandwidth(args.bandwidth_mib or (64 if args.smoke else 1024),
                               repeats=3 if args.smoke else 5)
        out["matmul_peak"] = matmul_peak(256 if args.smoke else 2048)
    out["load"] = load.record
    return out


def warm_up(works: Workloads, names: list[str], targets: dict, systems: list[str],
            passes: int) -> None:
    """Untimed passes of every workload on every system (other token ids than the repeats)."""
    for w in range(passes):
        for name in names:
            for s in systems:
                start = time.perf_counter()
                works.run(name, targets[s], seed=90_000 + 100 * w + names.index(name),
                          tag=f"warm{w}-{s}")
                print(f"warm-up {w} {name:18s} {s:9s} {time.perf_counter() - start:8.1f} s",
                      flush=True)


def measure_repeats(works: Workloads, names: list[str], targets: dict, systems: list[str],
                    repeats: int, order: str) -> tuple[dict, list]:
    """Every workload once per system per repeat, the systems alternating (abab or abba), with
    the load around each: (runs {workload: {system: [measurement]}}, the measurements' rows)."""
    runs: dict[str, dict[str, list]] = {n: {s: [] for s in systems} for n in names}
    measurements = []
    for r in range(repeats):
        turn_order = systems if order == "abab" or r % 2 == 0 else systems[::-1]
        for name in names:
            seed = 1000 * (r + 1) + names.index(name)        # the same ids for both
            for s in turn_order:
                with Load() as load:
                    m = works.run(name, targets[s], seed=seed, tag=f"r{r}-{s}")
                m["load"] = load.record
                runs[name][s].append(m)
                measurements.append({"repeat": r, "workload": name, "system": s,
                                     "value": m["value"], **load.record})
                print(f"repeat {r} {name:18s} {s:9s} {m['value']:10.3f}  load "
                      f"{load.record['loadavg_before'][0] if load.record['loadavg_before'] else '?'}"
                      f" others {load.record.get('others_cpus', '?')} cpus", flush=True)
    return runs, measurements


def explain_divergences(summary: dict, runs: dict, names: list[str], llm) -> None:
    """How close a call each token divergence was (llama.cpp's logits at it)."""
    for name in names:
        for d in summary[name].get("token_divergences", []):
            m = runs[name][PENSIEVE][d["repeat"]]
            seq = divergence_prefix(m["prompts"], m["tokens"], d["turn_index"], d["token_index"])
            d.update(near_tie(llm, seq, d.get(PENSIEVE), d.get(LLAMA)))


def decode_floor(summary: dict, systems: list[str], bandwidth: float, nbytes: int) -> dict:
    """Decode at batch 1 as a percentage of the memory-bandwidth floor."""
    floor_tok_s = bandwidth * 1e9 / nbytes
    decode = summary.get("decode_b1", {})

    def percent(value):
        return 100 * value / floor_tok_s if value else None
    return {"weights_bytes": nbytes, "bandwidth_gbs": bandwidth,
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


def contention_warning(measurements: list) -> str | None:
    """Why llama.cpp's numbers may be low: it ran while other processes took CPU."""
    busy = [m for m in measurements if m["system"] == LLAMA and (m.get("others_cpus") or 0) > 0.3]
    if not busy:
        return None
    return (f"{len(busy)} of the llama.cpp measurements ran while other processes used more "
            f"than 0.3 CPUs: llama.cpp's OpenMP threads spin at barriers, and with both cores "
            f"taken one of them is preempted and every barrier waits for it (decode fell from "
            f"56 to 0.4-8 tok/s on this 2-core box). Rerun on a quiet machine, or with "
            f"--llama-omp-wait passive")


def main(argv=None) -> dict:
    ap = make_parser()
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

    print("measuring memory bandwidth...", flush=True)
    result["memory_bandwidth"] = bw = measure_bandwidth(args)

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

        warm_up(works, names, targets, systems, warmup)
        runs, measurements = measure_repeats(works, names, targets, systems, repeats, args.order)
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
            explain_divergences(summary, runs, names, targets[LLAMA].llm)
            targets[LLAMA].llm.close()

    print("measuring memory bandwidth again...", flush=True)
    result["memory_bandwidth_end"] = bw_end = measure_bandwidth(args)
    floor = decode_floor(summary, systems, max(bw["read_gbs"], bw_end["read_gbs"]),
                         weights_bytes(model))
    tokens = works.describe()["prefill_512"]["prompt_tokens"]
    compute = prefill_floor(summary, systems, max(bw["matmul_peak"]["gflops"],
                                                  bw_end["matmul_peak"]["gflops"]),
                            prefill_flops(model, tokens), tokens)
    result.update({"systems": systems, "summary": summary, "decode_floor": floor,
                   "prefill_floor": compute,
                   "tokens_match": all(row.get("tokens_match", True) for row in summary.values())
                   if LLAMA in systems else None,
                   "measurements": measurements,
                   "runs": {n: {s: [{k: v for k, v in m.items() if k not in ("tokens", "prompts")}
                                    for m in runs[n][s]] for s in systems} for n in names}})
    warning = contention_warning(measurements)
    if warning and args.llama_omp_wait == "default":
        result["llama_cpp_contention_warning"] = warning
        print("warning:", warning)
    print_table(summary, systems, bw, floor)
    if "prefill_512" in summary:
        print_prefill_floor(compute, systems)
    if LLAMA in systems:
        print("greedy tokens identical:", result["tokens_match"])
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
