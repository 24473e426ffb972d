"""The end of a run: the policies' curves and equal-latency comparisons, the JSON, the plots;
and merging the runs of several processes (say the engine and a peer) into one result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from common import write_json

from .metrics import compare_policies, curve


def merge_results(paths: Sequence[str]) -> dict:
    """One result with the curves of several runs of the same workload (say the engine's
    policies and a peer measured in another process)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(results[0])
    merged["runs"] = {}
    merged["merged_from"] = [{"path": str(p), "command": r["command"]} for p, r in
                             zip(paths, results)]
    for p, r in zip(paths, results):
        if r["workload"] != results[0]["workload"]:
            raise SystemExit(f"{p}: a different workload than {paths[0]}")
        merged["runs"].update(r["runs"])
    return merged


def finish(result: dict, out: str | None, plots: bool) -> None:
    """Curves, equal-latency comparisons, the JSON and the plots."""
    curves = {k: curve(v) for k, v in result["runs"].items()}
    result["p90_curves"] = curves
    result["stateful_vs_stateless_at_equal_p90_latency"] = compare_policies(curves)
    if "hf" in curves:
        result["stateful_vs_hf_at_equal_p90_latency"] = compare_policies(curves, base="hf")
    for key, base in (("stateful_vs_stateless_at_equal_p90_latency", "stateless"),
                      ("stateful_vs_hf_at_equal_p90_latency", "hf")):
        for row in result.get(key, []):
            print(f"at p90 normalized latency {row['p90_normalized_latency_s'] * 1e3:.3g} "
                  f"ms/token: stateful {row['stateful_requests_per_s']:.2f} vs {base} "
                  f"{row[f'{base}_requests_per_s']:.2f} req/s = "
                  f"{'>=' if row['ratio_is_lower_bound'] else ''}{row['ratio']:.2f}x")
    if out:
        write_json(out, result, indent=1)
        if plots and result["runs"]:
            from .plots import plot
            for f in plot(result, str(Path(out).with_suffix(""))):
                print("wrote", f)
