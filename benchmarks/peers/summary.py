"""bench_peers.py's numbers from its measurements: medians per workload and system, ratios
Pensieve / llama.cpp, token divergences, each system's quietest repeat (least CPU used by other
processes), and the table printed at the end."""

from __future__ import annotations

import math
import statistics
from typing import Any

from peers import LLAMA, PENSIEVE
from peers.divergence import first_divergence


def median(xs):
    """The median of the numbers in xs (None and NaN left out); None when there are none."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def summarize(names: list[str], runs: dict, systems: list[str]) -> dict[str, Any]:
    """Per workload: each system's median and values (TTFT by turn where the workload has
    turns), and with llama.cpp the ratio Pensieve / llama.cpp and where the tokens diverge."""
    out = {}
    for name in names:
        row: dict[str, Any] = {}
        for s in systems:
            rs = runs[name][s]
            row[s] = {"median": median([r["value"] for r in rs]),
                      "values": [r["value"] for r in rs]}
            if name == "conversation_8":
                per_turn = list(zip(*[r["ttft_by_turn_s"] for r in rs]))
                row[s]["ttft_by_turn_s"] = [median(list(t)) for t in per_turn]
                row[s]["ttft_last_turn_s"] = row[s]["ttft_by_turn_s"][-1]
            if name == "conversations_8x4":
                per_turn = list(zip(*[r["mean_ttft_by_turn_s"] for r in rs]))
                row[s]["mean_ttft_by_turn_s"] = [median(list(t)) for t in per_turn]
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
    """The medians, the quietest repeats and the decode floor, one line each."""
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


def prefill_floor(summary: dict, systems: list[str], peak_gflops: float, flops: float,
                  tokens: int) -> dict:
    """prefill_512 as a percentage of the compute floor: the floating-point operations of a
    prefill of `tokens` (systems.prefill_flops) at the machine's f32 matmul peak
    (machine.matmul_peak)."""
    floor_tok_s = tokens * peak_gflops * 1e9 / flops
    prefill = summary.get("prefill_512", {})

    def percent(value):
        return 100 * value / floor_tok_s if value else None
    return {"tokens": tokens, "flops": flops, "peak_gflops": peak_gflops,
            "floor_tok_s": floor_tok_s,
            "prefill_percent_of_floor": {s: percent(prefill.get(s, {}).get("median"))
                                         for s in systems},
            "note": "floor = the prompt's tokens at the better of the two f32 matmul peak "
                    "measurements; a prefill's matmuls are smaller than the peak's (100% is "
                    "not reachable)"}


def print_prefill_floor(floor: dict, systems: list[str]) -> None:
    print(f"f32 matmul peak {floor['peak_gflops']:.0f} GFLOP/s; a {floor['tokens']}-token "
          f"prefill {floor['flops'] / 1e9:.1f} GFLOP; floor {floor['floor_tok_s']:.0f} tok/s; "
          "prefill: "
          + ", ".join(f"{s} {floor['prefill_percent_of_floor'][s]:.0f}%" for s in systems
                      if floor["prefill_percent_of_floor"].get(s) is not None))
