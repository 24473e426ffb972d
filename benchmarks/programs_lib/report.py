"""Numbers out of a run: its headline row, the medians per model and system with the new / old
ratios, the printed table, and the line a worker prints when a phase is done."""

from __future__ import annotations

import statistics
from typing import Any


def nested(d: Any, *path, default=None):
    """d[path[0]][path[1]]..., or default where a level is missing (a process that died)."""
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def row(run: dict) -> dict[str, Any]:
    """The headline numbers of one run (None where a process did not get there)."""
    cold, warm = run.get("cold", {}), run.get("warm", {})
    replay = cold.get("replay", {})
    programs = cold.get("engine_programs") or nested(cold, "startup", "engine_programs")
    return {
        "model": run["model"], "system": run["system"], "repeat": run["repeat"],
        "exit_codes": [cold.get("exit_code"), warm.get("exit_code")],
        "completed": bool(cold.get("completed")) and bool(warm.get("completed")),
        "startup_cold_s": nested(cold, "startup", "from_pretrained_s"),
        "startup_warm_s": nested(warm, "startup", "from_pretrained_s"),
        "compiled_before_ready": nested(cold, "startup", "compiles", "before_ready", "compiled"),
        "loaded_before_ready_warm": nested(warm, "startup", "compiles", "before_ready",
                                           "loaded"),
        "compilations_after_ready": nested(cold, "compiles", "compilations_after_ready"),
        "compile_s": nested(cold, "compiles", "compile_s_total"),
        "engine_program_count": (programs or {}).get("count"),
        "engine_compilations_after_ready": (programs or {}).get("compilations_after_ready"),
        "engine_warm": (programs or {}).get("warm"),
        "replay_turns": replay.get("turns"),
        "replay_wall_s": replay.get("wall_s"),
        "output_tokens_per_s": replay.get("output_tokens_per_s"),
        "step_tokens_per_s": replay.get("step_tokens_per_s"),
        "padded_over_real": nested(replay, "padding", "padded_over_real"),
        "maps_ready": nested(cold, "startup", "memory_ready", "maps"),
        "maps_after_replay": nested(replay, "memory_after", "maps"),
        "maps_peak": nested(cold, "memory_peak", "maps", default=cold.get("peak_maps_sampled")),
        "rss_ready_mib": nested(cold, "startup", "memory_ready", "rss_mib"),
        "rss_after_replay_mib": nested(replay, "memory_after", "rss_mib"),
        "ttft_turn_s": nested(warm, "ttft", "median_s"),
        "ttft_turn_first_s": nested(warm, "ttft", "first_conversation_s"),
        "warm_compilations_after_ready": nested(warm, "compiles", "compilations_after_ready"),
        "loadavg": [cold.get("loadavg_before"), cold.get("loadavg_after"),
                    warm.get("loadavg_after")],
    }


def median(xs):
    """The median of the numbers among xs (booleans and None left out), None if there are none."""
    xs = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return statistics.median(xs) if xs else None


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Per model and system: medians over repeats; per model: new / old ratios."""
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        per: dict[str, dict] = {}
        for system in dict.fromkeys(r["system"] for r in rows if r["model"] == model):
            rs = [r for r in rows if r["model"] == model and r["system"] == system]
            keys = [k for k, v in rs[0].items() if isinstance(v, (int, float))
                    and not isinstance(v, bool) and k != "repeat"]
            per[system] = {k: median([r[k] for r in rs]) for k in keys}
            per[system]["runs"] = len(rs)
            per[system]["all_completed"] = all(r["completed"] for r in rs)
        if "new" in per and "old" in per:
            n, o = per["new"], per["old"]
            ratio = lambda k: (n.get(k) / o[k] if n.get(k) is not None and o.get(k)  # noqa
                               else None)
            per["new_over_old"] = {k: ratio(k) for k in (
                "output_tokens_per_s", "replay_wall_s", "ttft_turn_s", "padded_over_real",
                "maps_after_replay", "rss_after_replay_mib", "startup_cold_s")}
        out[model] = per
    return out


def ms(x) -> str:
    """Seconds as whole milliseconds, "-" for None."""
    return "-" if x is None else f"{x * 1e3:.0f}"


def fmt(x, spec="{:.1f}") -> str:
    """x formatted by spec, "-" for None."""
    return "-" if x is None else spec.format(x)


COLUMNS = (   # header, width, the cell of a row
    ("model", 22, lambda r: r["model"][:22]),
    ("sys", 3, lambda r: r["system"]),
    ("r", 1, lambda r: str(r["repeat"])),
    ("exit c/w", 9, lambda r: "/".join(str(x) for x in r["exit_codes"])),
    ("start c/w s", 11, lambda r: f"{fmt(r['startup_cold_s'])}/{fmt(r['startup_warm_s'])}"),
    ("compiled pre/post", 17, lambda r: f"{fmt(r['compiled_before_ready'], '{}')}/"
                                        f"{fmt(r['compilations_after_ready'], '{}')}"),
    ("comp s", 7, lambda r: fmt(r["compile_s"])),
    ("replay s", 8, lambda r: fmt(r["replay_wall_s"])),
    ("out t/s", 7, lambda r: fmt(r["output_tokens_per_s"])),
    ("pad", 5, lambda r: fmt(r["padded_over_real"], "{:.2f}")),
    ("maps rdy/end/peak", 19, lambda r: "/".join(fmt(r[k], "{}") for k in (
        "maps_ready", "maps_after_replay", "maps_peak"))),
    ("RSS MiB rdy/end", 15, lambda r: f"{fmt(r['rss_ready_mib'], '{:.0f}')}/"
                                      f"{fmt(r['rss_after_replay_mib'], '{:.0f}')}"),
    ("TTFT ms", 7, lambda r: ms(r["ttft_turn_s"])),
)


def print_table(rows: list[dict], summary: dict) -> None:
    """A line per run (COLUMNS), then per model the new / old ratios of the medians."""
    head = " ".join(f"{h:{'<' if i == 0 else '>'}{w}s}" for i, (h, w, _) in enumerate(COLUMNS))
    print(head)
    print("-" * len(head))
    for r in rows:
        print(" ".join(f"{cell(r):{'<' if i == 0 else '>'}{w}s}"
                       for i, (_, w, cell) in enumerate(COLUMNS)))
    for model, per in summary.items():
        if "new_over_old" in per:
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in per["new_over_old"].items()
                               if v is not None)
            print(f"{model}: new / old (medians): {ratios}")


def phase_line(phase: str, r: dict) -> str:
    """What a worker prints when a phase is done."""
    if phase == "replay":
        pad = r["padding"].get("padded_over_real")
        return (f"{r['wall_s']:.1f} s, {r['output_tokens_per_s']:.1f} out tok/s, "
                f"{r['compilations_during']} compilations, padding "
                f"{'-' if pad is None else f'{pad:.2f}'}, maps {r['memory_after'].get('maps')}")
    return (f"turn {r['turn']} TTFT median {ms(r['median_s'])} ms (first conversation "
            f"{ms(r['first_conversation_s'])} ms)")
