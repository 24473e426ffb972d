"""Multi-turn serving benchmark: replay a conversation workload against the engine with the
stateful and the stateless cache policy (and optionally a Hugging Face `generate` peer), at one
or several conversation arrival rates, and report what the Pensieve paper reports:

  - throughput (requests/s, output tokens/s) against normalized latency (end-to-end seconds per
    output token: mean, p50, p90), one curve per policy;
  - TTFT by turn index (stateful should stay flat, stateless grows with the history);
  - prompt tokens by where they came from (cached in device pages / prefilled / recomputed),
    device pages in use, preemptions, compilations.

    python benchmarks/multiturn.py --model smollm2-135m-instruct --workload sharegpt \
        --scale 0.25 --conversations 10 --users 2 10 --think-time 1 --policy both \
        --out benchmarks/results/multiturn_smollm2_cpu.json      # + _latency.png, _ttft.png

Workloads (benchmarks/workload.py): sharegpt / ultrachat (synthetic, seeded), mrqa (shared
system prompt, fixed answers), or a ShareGPT-format file (--dataset PATH). Conversations arrive
as a Poisson process (--rate conversations/s, `inf`: all at once; several rates give the curve);
each is a closed-loop user with exponential think time (--think-time, mean seconds); --users
caps how many run at once (a conversation that arrives while all users are busy waits). Several
--rate or --users values give several load points (`--rate inf --users 2 10`: 2, then 10
closed-loop users working through the same conversations).

Replay is token-level by default: random token ids with the drawn lengths and
SamplingParams(max_tokens=answer_len, ignore_eos=True), so every policy does the same work (and,
greedy, produces the same tokens). --text replays a dataset's real user messages through the
chat template (engine sessions) with the model's own replies (stops at end of turn).

The engine runs a fixed set of step programs (one per token bucket; pensieve_jax.runner.model_runner's
ProgramSet), each compiled once (seconds on CPU), which must not land in the measured numbers.
So before measuring: (1) --precompile all (the default) builds each policy's engine and compiles
its whole program set with `engine.warm_up()` (seconds and program count in the results, under
`precompile`), through JAX's persistent compilation cache (--compile-cache; a second run loads
them instead of compiling); engines of both policies share these programs in-process;
--precompile none leaves them to compile on first use; (2) up to --warmup-passes passes of the
same workload with other token ids and conversation ids (so the measured pass never hits their
cache) until one compiles nothing new; (3) the measured pass, rerun under new conversation ids
if it still compiled (--max-retries). The compilations of the reported pass are in the results
(`compilations_while_measured`).

Throughput and latency come from the steady part of the run: requests that finish between the
10th and 90th percentile of finish times (ramp-up and the drain of the last long conversations
left out); whole-run numbers are reported too.

--via grpc puts each policy's engine behind an in-process gRPC server (serving.server) and
replays through serving.client (Generate with token ids; Chat sessions in text mode);
--target HOST:PORT replays against a running server as one more curve ("remote").

--peer hf runs transformers `generate` on the same model (a GGUF file or HF directory), stateless
(the whole history each turn), with static batching of whatever requests are waiting. It needs
torch and transformers: in this process if they import, else in `--peer-python` (another
interpreter with them, e.g. /work/hfref/bin/python), which runs this file with --peer-only.
"""

# The parts: benchmarks/multiturn_lib/ (targets, replay, measure, metrics, precompile, runners,
# report, plots); this file is the command line.

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload as wl  # noqa: E402
from common import environment  # noqa: E402
from multiturn_lib import hf_peer  # noqa: E402
from multiturn_lib.precompile import enable_compile_cache  # noqa: E402
from multiturn_lib.report import finish, merge_results  # noqa: E402
from multiturn_lib.runners import run_engine_policies, run_hf_peer, run_remote  # noqa: E402


def build_workload(args, tokenizer=None) -> tuple[list[wl.Conversation], str]:
    """The conversations, from --dataset or a --workload generator, and the workload's name."""
    if args.dataset:
        convs = wl.load_sharegpt(args.dataset, tokenizer=tokenizer,
                                 max_conversations=args.conversations,
                                 max_context=args.max_context,
                                 default_answer_len=args.default_answer_len)
        # token mode: the dataset's answer lengths (capped); text mode: the model stops at its
        # end of turn, at most --max-answer tokens
        convs = [dataclasses.replace(c, turns=tuple(
            dataclasses.replace(t, answer_len=args.max_answer if args.text else
                                min(args.max_answer, t.answer_len))
            for t in c.turns)) for c in convs]
        return convs, Path(args.dataset).stem
    gen = wl.GENERATORS[args.workload]
    kw = {"max_context": args.max_context, "max_turns": args.max_turns} \
        if args.workload != "mrqa" else {}
    return gen(args.conversations, seed=args.seed, scale=args.scale, **kw), args.workload


def parse_rate(s: str) -> float:
    return math.inf if s.lower() in ("inf", "infinity", "max") else float(s)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workload", choices=sorted(wl.GENERATORS), default="sharegpt")
    ap.add_argument("--dataset", help="a ShareGPT-format JSON/JSONL file instead of --workload")
    ap.add_argument("--text", action="store_true",
                    help="replay the dataset's text through the chat template (needs --dataset)")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--scale", type=float, default=0.25, help="length scale of synthetic shapes")
    ap.add_argument("--max-context", type=int, default=1024,
                    help="drop a conversation's turns past this many tokens")
    ap.add_argument("--max-turns", type=int)
    ap.add_argument("--max-answer", type=int, default=256,
                    help="cap on answer tokens of a --dataset turn")
    ap.add_argument("--default-answer-len", type=int, default=128)
    ap.add_argument("--rate", type=parse_rate, nargs="+", default=[math.inf],
                    help="conversation arrival rates per second (Poisson); inf: all at once")
    ap.add_argument("--users", type=int, nargs="+",
                    help="at most this many conversations at once (several: load points)")
    ap.add_argument("--think-time", type=float, default=1.0, help="mean think time (s)")
    ap.add_argument("--policy", choices=("stateful", "stateless", "both", "none"), default="both")
    ap.add_argument("--via", choices=("inprocess", "grpc"), default="inprocess",
                    help="drive the engines directly, or through a gRPC server around each")
    ap.add_argument("--target", metavar="HOST:PORT",
                    help="also replay against a running Pensieve gRPC server ('remote')")
    ap.add_argument("--peer", choices=("hf",), help="also run Hugging Face transformers generate")
    ap.add_argument("--peer-python", help="interpreter with torch + transformers for --peer hf")
    ap.add_argument("--peer-batch", type=int, default=16, help="largest static batch of the peer")
    ap.add_argument("--peer-threads", type=int, help="torch CPU threads of the peer")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batched-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int)
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--num-pages", type=int)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--engine-option", action="append", metavar="KEY=VALUE",
                    help="another EngineConfig field, e.g. host_cache_bytes=1000000000")
    ap.add_argument("--warmup-passes", type=int, default=1,
                    help="at most this many warm-up passes per rate (stop at one that compiles "
                         "nothing)")
    ap.add_argument("--max-retries", type=int, default=2,
                    help="rerun a measured pass that compiled something (at most this often)")
    ap.add_argument("--precompile", choices=("all", "grid", "none"), default="all",
                    help="all: compile the engine's whole step program set (engine.warm_up) "
                         "before the warm-up passes; none: compile on first use; grid: the "
                         "same as all (the old power-of-two grid is gone)")
    ap.add_argument("--compile-cache",
                    help="JAX persistent compilation cache directory ('none': off; default: "
                         "$PENSIEVE_JAX_CACHE, else ~/.cache/pensieve_jax/xla)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--check-outputs", action="store_true",
                    help="compare the policies' generated tokens (token mode)")
    ap.add_argument("--out", help="results JSON (plots next to it: <stem>_latency/_ttft.png)")
    ap.add_argument("--merge", nargs="+", metavar="RESULT_JSON",
                    help="only merge the curves of earlier runs of one workload into --out")
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    progress = not args.no_progress
    if args.merge:
        result = merge_results(args.merge)
        finish(result, args.out, not args.no_plots)
        return result
    if args.text and not args.dataset:
        raise SystemExit("--text needs --dataset (a ShareGPT-format file)")
    if args.peer_only:                      # the peer in its own interpreter: no jax here
        return _peer_only(args, progress)

    from pensieve_jax.weights import load_model
    cache_dir = enable_compile_cache(args.compile_cache)
    model = load_model(args.model, args.dtype)
    convs, name = build_workload(args, model.tokenizer)
    summary = wl.schedule(convs, args.rate[0], args.think_time, args.seed).summary()
    summary["name"] = name
    result: dict[str, Any] = {**environment(argv, __file__), "model": model.source,
                              "dtype": args.dtype, "args": vars(args), "workload": summary,
                              "compile_cache": cache_dir, "runs": {}}
    print(f"workload: {json.dumps(summary)}", flush=True)
    policies = {"both": ["stateful", "stateless"], "none": []}.get(args.policy, [args.policy])
    if policies:
        result["runs"].update(run_engine_policies(policies, model, convs, args, progress))
    if args.target:
        result["runs"]["remote"] = run_remote(args.target, model, convs, args, progress)
    if args.peer == "hf":
        result["runs"]["hf"] = _peer_points(args, argv, convs, progress)

    outputs = {k: [p.pop("_outputs", None) for p in v] for k, v in result["runs"].items()}
    if args.check_outputs and "stateful" in outputs and "stateless" in outputs:
        result["same_outputs"] = outputs["stateful"] == outputs["stateless"]
    finish(result, args.out, not args.no_plots)
    return result


def _peer_points(args, argv, convs, progress: bool) -> list[dict]:
    """--peer hf: here if torch and transformers import, else in --peer-python."""
    model_path = hf_peer.resolve_model_path(args.model)
    if model_path is None:
        raise SystemExit(f"--peer hf needs a GGUF file or HF directory, not {args.model}")
    if hf_peer.available():
        return run_hf_peer(convs, args, model_path, progress)
    if args.peer_python:
        return hf_peer.run_in_subprocess(args.peer_python, __file__,
                                         argv if argv is not None else sys.argv[1:])
    raise SystemExit("--peer hf needs torch and transformers here, or --peer-python")


def _peer_only(args, progress: bool) -> dict:
    """The peer's side of --peer-python: its points, in --out, for the parent process."""
    model_path = hf_peer.resolve_model_path(args.model)
    tok = hf_peer.load_tokenizer(model_path) if args.dataset else None
    convs, _ = build_workload(args, tok)
    points = run_hf_peer(convs, args, model_path, progress)
    Path(args.out).write_text(json.dumps({"hf": points}))
    return {"hf": points}


if __name__ == "__main__":
    main()
