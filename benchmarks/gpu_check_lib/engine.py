"""Phase engine of benchmarks/gpu_check.py: the engine, stateful against stateless, on a
ShareGPT-shaped multi-turn replay (benchmarks/multiturn.py's workload and multiturn_lib's
measurement) at two loads: throughput at equal p90 normalized latency, TTFT by turn, whether
both policies produced the same tokens, and the attention the engine chose.
"""

from __future__ import annotations

import time

from gpu_check_lib.results import Phase


def engine_argv(dry: bool) -> list[str]:
    """benchmarks/multiturn.py arguments of the replay (its parser gives the defaults)."""
    if dry:
        return ["--model", "random:tiny", "--dtype", "float32", "--conversations", "3",
                "--scale", "0.05", "--max-context", "120", "--users", "1", "2",
                "--think-time", "0", "--max-batched-tokens", "8", "--page-size", "16",
                "--max-model-len", "256", "--max-num-seqs", "2"]
    return ["--model", "random:llama3-8b", "--dtype", "bfloat16", "--conversations", "16",
            "--scale", "0.5", "--max-context", "2048", "--max-turns", "8", "--users", "4", "16",
            "--think-time", "0.2", "--max-batched-tokens", "256", "--page-size", "16",
            "--max-model-len", "2304", "--max-num-seqs", "16",
            "--engine-option", f"kv_cache_bytes={8 << 30}"]


def point_summary(p: dict) -> dict:
    """A measured point without its per-turn records and outputs."""
    return {k: v for k, v in p.items() if k not in ("turns", "_outputs")}


def same_turns(a: dict, b: dict) -> tuple[int, int]:
    """(turns with the same tokens, turns) of two policies' outputs {conversation: [turns]}."""
    pairs = [(x, y) for conv in a for x, y in zip(a[conv], b.get(conv, []))]
    return sum(x == y for x, y in pairs), len(pairs)


def phase_engine(ph: Phase) -> dict:
    import math
    import multiturn
    import workload as wl
    from multiturn_lib.engine_target import EngineTarget
    from multiturn_lib.measure import measure
    from multiturn_lib.precompile import enable_compile_cache
    from multiturn_lib.runners import load_points, make_engine, print_point
    from pensieve_jax.weights import load_model
    args = multiturn.make_parser().parse_args(engine_argv(ph.dry_run))
    enable_compile_cache(args.compile_cache)
    start = time.time()
    model = load_model(args.model, args.dtype)
    convs, name = multiturn.build_workload(args)
    ph.result.update(model=model.source, dtype=args.dtype, workload={
        "name": name, **wl.schedule(convs, math.inf, args.think_time, args.seed).summary()},
        args=vars(args), points={}, same_outputs={}, precompile={}, attention={})
    engines = {}
    try:
        for policy in ("stateful", "stateless"):
            engine, _, pre = make_engine(policy, model, convs, args)
            engines[policy] = engine
            ph.result["precompile"][policy] = pre
            ph.result["attention"][policy] = engine.stats().get("attention_check")
        ph.result["setup_s"] = round(time.time() - start, 1)
        ph.save()
        targets = {p: EngineTarget(e) for p, e in engines.items()}
        last_point_s = 0.0
        for rate, users in load_points(args):
            if not ph.has_time(1.3 * last_point_s + (2 if ph.dry_run else 10),
                               f"load point users={users}"):
                break
            t0 = time.time()
            workload = wl.schedule(convs, rate, args.think_time, args.seed)
            outputs = {}
            for policy, target in targets.items():
                p = measure(target, workload, seed=args.seed, users=users, warmup_passes=0,
                            progress=False, label=f"{policy} users={users}", keep_outputs=True,
                            max_retries=1)
                outputs[policy] = p.pop("_outputs")
                ph.result["points"].setdefault(policy, []).append(point_summary(p))
                print_point(policy, p)
            same, total = same_turns(outputs["stateful"], outputs["stateless"])
            ph.result["same_outputs"][str(users)] = {"same_turns": same, "turns": total}
            ph.save()
            last_point_s = time.time() - t0
    finally:
        for engine in engines.values():
            engine.shutdown()
    return engine_summary(ph.result)


def engine_summary(r: dict) -> dict:
    """Equal-latency comparison and TTFT by turn (the busiest point) from the measured points."""
    from multiturn_lib.metrics import compare_policies, curve
    points = r["points"]
    curves = {k: curve(v) for k, v in points.items()}
    equal = compare_policies(curves)
    ttft = {k: v[-1]["ttft_by_turn"] for k, v in points.items() if v}
    last_turn = {k: v[-1]["mean"] for k, v in ttft.items() if v}
    attention = {k: (v or {}).get("attention") for k, v in r["attention"].items()}
    return {"p90_curves": curves, "stateful_vs_stateless_at_equal_p90_latency": equal,
            "ttft_by_turn": ttft, "headline": {
                "ratio_at_equal_p90": [round(row["ratio"], 3) for row in equal],
                "ttft_last_turn_s": last_turn, "attention": attention,
                "same_outputs": r["same_outputs"],
                "points": {k: len(v) for k, v in points.items()}}}
