"""The curves of a run, load point by load point: the engine per cache policy (in process or
behind a gRPC server), a running server, and the Hugging Face peer."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import workload as wl

from .grpc_target import GrpcTarget
from .measure import measure
from .metrics import load_key, load_text
from .precompile import warm_up


def load_points(args) -> list[tuple[float, int | None]]:
    """(arrival rate, users) per load point: --rate and --users, one broadcast to the other."""
    rates, users = list(args.rate), list(args.users or [None])
    if len(rates) > 1 and len(users) > 1 and len(rates) != len(users):
        raise SystemExit("--rate and --users: give one value, or as many values as the other")
    n = max(len(rates), len(users))
    return list(zip(rates * n if len(rates) == 1 else rates, users * n if len(users) == 1
                    else users))


def engine_options(items: Sequence[str] | None) -> dict[str, Any]:
    """KEY=VALUE strings (EngineConfig fields) as typed values: ints, floats, else strings."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-option needs KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = None if value == "None" else value
    return out


def _max_users(args, convs) -> int:
    return max((u or len(convs)) for _, u in load_points(args))


def _context_bound(conv: wl.Conversation, text: bool) -> int:
    """Tokens the conversation can reach (text mode: plus chat-template tokens per message)."""
    return conv.context_len() + 1 + ((16 + 16 * len(conv.turns)) if text else 0)


def make_engine(policy: str, model, convs, args):
    """An engine for one cache policy. --precompile all: its whole step program set compiled
    (engine.warm_up(), timed) before any pass; engines of the same shapes share compiled
    programs in-process, so the second policy's warm-up is nearly free. none: programs compile
    on first use (the warm-up passes do the compiling)."""
    from pensieve_jax.engine.engine import Engine, EngineConfig
    max_ctx = max(_context_bound(c, args.text) for c in convs)
    max_len = args.max_model_len or max(1024, max_ctx)
    config = EngineConfig(
        page_size=args.page_size, num_pages=args.num_pages, max_model_len=max_len,
        max_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_num_seqs or max(8, min(64, _max_users(args, convs))),
        cache_policy=policy, **{"precompile": False, **engine_options(args.engine_option)})
    engine = Engine(model, args.dtype, config)
    pre = None
    if args.precompile != "none":
        pre = warm_up(engine)
        print(f"{policy}: warmed up {pre}", flush=True)
    return engine, config, pre


def run_engine_policies(policies: Sequence[str], model, convs, args, progress: bool
                        ) -> dict[str, list[dict]]:
    """One engine per policy, all built (and warmed up) first; then, rate by rate, each
    policy's warm-up and measured passes back to back, so a slow spell of a shared machine
    falls on both policies rather than on one."""
    from .engine_target import EngineTarget
    engines, servers = {}, []
    try:
        for policy in policies:
            engines[policy] = make_engine(policy, model, convs, args)
        targets = {}
        for policy, (engine, _, _) in engines.items():
            if args.via == "grpc":                  # the engine behind a gRPC server
                from serving.server import BackgroundServer
                servers.append(BackgroundServer(engine))
                targets[policy] = GrpcTarget(servers[-1].target, model.config.vocab_size,
                                             text=args.text)
            else:
                targets[policy] = EngineTarget(engine, text=args.text)
        runs: dict[str, list[dict]] = {p: [] for p in policies}
        for rate, users in load_points(args):
            workload = wl.schedule(convs, rate, args.think_time, args.seed)
            for policy in policies:
                engine, config, pre = engines[policy]
                p = measure(targets[policy], workload, seed=args.seed,
                            users=users, warmup_passes=args.warmup_passes,
                            progress=progress, label=f"{policy} {load_text(rate, users)}",
                            keep_outputs=args.check_outputs, max_retries=args.max_retries)
                p["engine_config"] = dataclasses.asdict(config)
                p["via"] = args.via
                if not runs[policy]:
                    p["precompile"] = pre
                runs[policy].append(p)
                print_point(policy, p)
        return runs
    finally:
        for server in servers:
            server.stop()
        for engine, _, _ in engines.values():
            engine.shutdown()


def run_remote(address: str, model, convs, args, progress: bool) -> list[dict]:
    """A running server (its own policy and warm-up state: no warm-up from here)."""
    target = GrpcTarget(address, model.config.vocab_size, text=args.text)
    points = []
    for rate, users in load_points(args):
        workload = wl.schedule(convs, rate, args.think_time, args.seed)
        p = measure(target, workload, seed=args.seed, users=users,
                    warmup_passes=args.warmup_passes, progress=progress,
                    label=f"remote {load_text(rate, users)}", max_retries=args.max_retries)
        p["via"] = f"grpc {address}"
        points.append(p)
        print_point("remote", p)
    target.client.close()
    return points


def run_hf_peer(convs, args, model_path: str, progress: bool) -> list[dict]:
    """transformers generate in this process, at every load point."""
    from .hf_peer import HFTarget
    target = HFTarget(model_path, args.dtype, args.peer_batch, text=args.text,
                      threads=args.peer_threads)
    points = []
    try:
        for rate, users in load_points(args):
            workload = wl.schedule(convs, rate, args.think_time, args.seed)
            p = measure(target, workload, seed=args.seed, users=users,
                        warmup_passes=min(1, args.warmup_passes), progress=progress,
                        label=f"hf {load_text(rate, users)}")
            p["device"] = target.device
            points.append(p)
            print_point("hf", p)
    finally:
        target.shutdown()
    return points


def print_point(name: str, p: dict) -> None:
    s = p["steady"]
    nl = s["normalized_latency_s_per_token"]
    ttft = " ".join(f"{r['mean']:.2f}" for r in p["ttft_by_turn"][:8])
    tok = p["tokens"]
    print(f"{name:9s} {load_text(*load_key(p)):>28s}: "
          f"{s['requests_per_s']:.2f} req/s {s['output_tokens_per_s']:.1f} out tok/s | "
          f"norm. latency mean {nl['mean'] * 1e3:.0f} p50 {nl['p50'] * 1e3:.0f} "
          f"p90 {nl['p90'] * 1e3:.0f} ms/tok | TTFT by turn {ttft} s | cached "
          f"{tok.get('cached_tokens', 0)} prefilled {tok.get('prefilled_tokens', 0)} recomputed "
          f"{tok.get('recomputed_tokens', 0)} | compiled {p['compilations_while_measured']}",
          flush=True)
