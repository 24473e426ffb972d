"""What a pass measured: throughput, normalized latency and TTFT percentiles (steady window and
whole run), TTFT by turn, prompt tokens by tier, the model step profile; and the curves and
equal-latency comparisons between policies."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .turns import TurnRecord


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def latency_stats(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)) if len(xs) else float("nan"), "p50": _pct(xs, 50),
            "p90": _pct(xs, 90), "p99": _pct(xs, 99)}


def summarize_pass(records: Sequence[TurnRecord], wall_s: float,
                   window: tuple[float, float] = (10, 90)) -> dict[str, Any]:
    """Throughput, normalized latency, TTFT by turn and token accounting of one pass."""
    finishes = np.array([r.finish_s for r in records])
    lo, hi = np.percentile(finishes, window) if len(records) else (0.0, 0.0)
    steady = [r for r in records if lo <= r.finish_s <= hi]
    span = hi - lo
    if span <= 0 or len(steady) < 2:        # too few requests for a window: the whole run
        steady, span = list(records), wall_s

    def block(rs, seconds):
        out_tokens = sum(r.completion_tokens for r in rs)
        return {"requests": len(rs), "seconds": seconds,
                "requests_per_s": len(rs) / seconds if seconds > 0 else float("nan"),
                "output_tokens_per_s": out_tokens / seconds if seconds > 0 else float("nan"),
                "normalized_latency_s_per_token": latency_stats([r.normalized_latency for r in rs]),
                "e2e_latency_s": latency_stats([r.e2e_s for r in rs]),
                "ttft_s": latency_stats([r.ttft_s for r in rs])}

    by_turn: dict[int, list[TurnRecord]] = {}
    for r in records:
        by_turn.setdefault(r.turn, []).append(r)
    ttft_by_turn = [{"turn": k, "n": len(rs), **latency_stats([r.ttft_s for r in rs]),
                     "mean_prompt_tokens": float(np.mean([r.usage.get("prompt_tokens", 0)
                                                          for r in rs]))}
                    for k, rs in sorted(by_turn.items())]
    tokens: dict[str, float] = {}
    for r in records:
        for key, v in r.usage.items():
            if key.endswith("_tokens"):
                tokens[key] = tokens.get(key, 0) + v
    prompt = tokens.get("prompt_tokens", 0) or 1
    host = tokens.get("cached_host_tokens", 0)
    tiers = {"device_hit": tokens.get("cached_tokens", 0) - host, "host_hit": host,
             "prefilled": tokens.get("prefilled_tokens", 0),
             "recomputed": tokens.get("recomputed_tokens", 0)}
    return {
        "steady": block(steady, span), "whole_run": block(records, wall_s),
        "steady_window_s": [float(lo), float(hi)],
        "ttft_by_turn": ttft_by_turn,
        "tokens": {k: int(v) for k, v in sorted(tokens.items())},
        # where each prompt token's KV came from (fractions of prompt_tokens)
        "prompt_tokens_by_tier": {k: v / prompt for k, v in tiers.items()},
    }


def step_profile(log: Sequence[tuple]) -> dict[str, Any]:
    """Model step time split into decode-only steps and steps that carry prefill (or
    recompute) chunks; with the padded shapes the XLA attention path computes."""
    out: dict[str, Any] = {"steps": len(log), "seconds": float(sum(r[5] for r in log))}
    for kind, rows in (("decode", [r for r in log if r[3] <= 1]),
                       ("prefill_mixed", [r for r in log if r[3] > 1])):
        if not rows:
            continue
        secs = [r[5] for r in rows]
        out[kind] = {
            "steps": len(rows), "seconds": float(sum(secs)), "mean_step_s": float(np.mean(secs)),
            "tokens": int(sum(r[0] for r in rows)), "mean_seqs": float(np.mean([r[1] for r in rows])),
            "mean_pages_per_seq": float(np.mean([r[2] for r in rows])),
            "mean_context_tokens": float(np.mean([r[4] for r in rows])),
            "tokens_per_s": float(sum(r[0] for r in rows) / max(sum(secs), 1e-9)),
        }
    return out


def numeric_delta(before: dict, after: dict) -> dict[str, Any]:
    """after - before for the top-level numbers of two stats dicts."""
    out = {}
    for k, v in after.items():
        b = before.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(b, (int, float)):
            out[k] = v - b
    return out


def load_key(p: dict) -> tuple[float, int | None]:
    """A measured point's load: (arrival rate, users)."""
    return p["rate_conversations_per_s"], p.get("users")


def load_text(rate: float, users: int | None) -> str:
    text = "all at once" if math.isinf(rate) else f"{rate:g} conversations/s"
    return text + (f", {users} users" if users else "")


def curve(points: Sequence[dict], metric: str = "p90") -> list[tuple[float, float]]:
    """(throughput requests/s, normalized latency) per rate, sorted by throughput."""
    pts = [(p["steady"]["requests_per_s"], p["steady"]["normalized_latency_s_per_token"][metric])
           for p in points]
    return sorted(pts)


def throughput_at_latency(pts: Sequence[tuple[float, float]], latency: float
                          ) -> tuple[float, bool]:
    """Highest throughput at which the curve's latency is <= `latency`, interpolating between
    measured points (latency taken as rising with throughput). Returns (throughput, exact):
    exact False when every point is under `latency` (the value is then a lower bound)."""
    best = None
    for i, (x, y) in enumerate(pts):
        if y <= latency:
            best = x if best is None else max(best, x)
            if i + 1 < len(pts) and pts[i + 1][1] > latency:
                x2, y2 = pts[i + 1]
                best = max(best, x + (x2 - x) * (latency - y) / (y2 - y))
    if best is None:
        return 0.0, True
    return best, not all(y <= latency for _, y in pts)


def compare_policies(curves: dict[str, list[tuple[float, float]]], base: str = "stateless",
                     other: str = "stateful") -> list[dict[str, Any]]:
    """At each latency the base policy reaches, the other policy's throughput over base's."""
    if base not in curves or other not in curves:
        return []
    rows = []
    for _, lat in curves[base]:
        tb = throughput_at_latency(curves[base], lat)[0]
        to, exact_o = throughput_at_latency(curves[other], lat)
        rows.append({"p90_normalized_latency_s": lat, f"{base}_requests_per_s": tb,
                     f"{other}_requests_per_s": to,
                     "ratio": to / tb if tb > 0 else float("inf"),
                     "ratio_is_lower_bound": not exact_o})
    return rows
