"""The engine's step programs: what compiling them costs, when, and what it does to serving.
Today's engine (commit b4dcccf) compiles one program per padded step shape it meets, lazily, on
the serving path; issue 16's engine compiles a small fixed set before it is ready. This runs
both side by side, each in its own processes (clean compile state and memory mappings):

    python benchmarks/bench_programs.py --model random:tiny smollm2-135m-instruct \
        --systems new,old --repeats 1 --out benchmarks/results/bench_programs_cpu.json

Per model, system (`new`: this checkout; `old`: a git worktree of --old-commit, imported
through PYTHONPATH) and repeat, two processes share one empty temporary $PENSIEVE_JAX_CACHE
(converted models are linked into it, so only compiled programs start cold):

  cold   Engine.from_pretrained(model) to ready (nothing compiled, nothing cached), then a
         closed-loop replay of --conversations ShareGPT-shaped conversations (token level,
         ignore_eos, --in-flight at once, --think-time between turns): compilations after
         ready, compile seconds, wall time, tokens/s, padded / real step tokens, and the
         process's memory mappings (/proc/self/maps lines) and RSS after start-up, after the
         replay and at their peak (sampled every 0.5 s).
  warm   Engine.from_pretrained again over the same cache directory (start-up with the
         compilation cache filled by `cold`), then the time to first token of turn
         --ttft-turns of a conversation alone on the engine (--ttft-user-tokens new tokens a
         turn, --ttft-reply-tokens replies, greedy, ignore_eos): one untimed conversation,
         then the median over --ttft-repeats.

The old engine compiles nothing before it is ready: its start-up is short and all its
compiling lands in the replay (and in the TTFT run's untimed first conversation).

Compilations are counted in the process with a jax.monitoring listener on
/jax/core/compile/backend_compile_duration (every jitted function, split at the moment the
engine is ready; loads from JAX's persistent cache are counted apart), independent of what the
engine reports; `engine_programs` is the engine's own stats()["programs"] where it has one.
Systems alternate (new, old, new, old, ...); the 1-minute load average is recorded before and
after each process. A process that dies (the old engine has been seen to die near
vm.max_map_count = 65530 mappings) is recorded with its exit code (as a shell reports it: 134 is
SIGABRT, 139 SIGSEGV), its last samples and the tail of its stderr; the benchmark goes on.

--quick: tiny sizes for the test (a few conversations, short turns).
"""

# This script is the command line, the sizes and the loop over models, systems and repeats;
# the parts live in programs_lib/ (its __init__ lists them). `--worker SPEC_JSON` (internal)
# runs one worker process: programs_lib.worker.worker(spec).

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from common import environment, write_json  # noqa: E402
# the parts: programs_lib/ (programs_lib/__init__.py lists them); none imports jax or pensieve_jax
from programs_lib.processes import (add_worktree, model_cache_dir, prepare_model,  # noqa: E402
                                    remove_worktree, run_system)
from programs_lib.report import print_table, row, summarize  # noqa: E402
from programs_lib.worker import worker  # noqa: E402

OLD_COMMIT = "b4dcccf"        # the engine before issue 16: lazy compiling
SYSTEMS = ("new", "old")

# the sizes: the replay (48 conversations, 32 in flight, 512-token steps) and a tiny one
FULL = dict(conversations=48, in_flight=32, scale=0.25, max_context=1024, max_model_len=1024,
            max_batched_tokens=512, ttft_turns=8, ttft_user_tokens=72, ttft_reply_tokens=32,
            ttft_repeats=3)
QUICK = dict(conversations=6, in_flight=3, scale=0.1, max_context=192, max_model_len=256,
             max_batched_tokens=32, ttft_turns=3, ttft_user_tokens=16, ttft_reply_tokens=4,
             ttft_repeats=1)


# -- command line --------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["random:tiny", "smollm2-135m-instruct"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--systems", default="new,old",
                    help="comma-separated: new (this checkout), old (--old-commit)")
    ap.add_argument("--old-commit", default=OLD_COMMIT,
                    help="the 'old' system: a git worktree of this commit")
    ap.add_argument("--new-source", default=str(REPO),
                    help="the 'new' system: a checkout to import pensieve_jax from")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per system, alternating (new, old, new, old, ...)")
    ap.add_argument("--conversations", type=int, help=f"default {FULL['conversations']}")
    ap.add_argument("--in-flight", type=int,
                    help=f"conversations at once (and max_num_seqs); default {FULL['in_flight']}")
    ap.add_argument("--scale", type=float, help="length scale of the ShareGPT shapes; "
                    f"default {FULL['scale']}")
    ap.add_argument("--max-context", type=int, help=f"default {FULL['max_context']}")
    ap.add_argument("--max-model-len", type=int, help=f"default {FULL['max_model_len']}")
    ap.add_argument("--max-batched-tokens", type=int,
                    help=f"default {FULL['max_batched_tokens']}")
    ap.add_argument("--think-time", type=float, default=0.0, help="mean seconds between turns")
    ap.add_argument("--ttft-turns", type=int, help=f"default {FULL['ttft_turns']}")
    ap.add_argument("--ttft-user-tokens", type=int, help=f"default {FULL['ttft_user_tokens']}")
    ap.add_argument("--ttft-reply-tokens", type=int, help=f"default {FULL['ttft_reply_tokens']}")
    ap.add_argument("--ttft-repeats", type=int, help=f"default {FULL['ttft_repeats']}")
    ap.add_argument("--ttft-think-time", type=float, default=0.0,
                    help="seconds the TTFT conversation waits before each next turn (0: sends it "
                         "as the reply ends, so it also waits for the reply's cache flush)")
    ap.add_argument("--engine-option", action="append", metavar="KEY=VALUE",
                    help="another EngineConfig field (dropped for a system that lacks it)")
    ap.add_argument("--no-replay", action="store_true", help="start-up and TTFT only")
    ap.add_argument("--no-ttft", action="store_true", help="start-up and replay only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the test)")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_programs_cpu.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def resolve_sizes(args) -> dict[str, Any]:
    sizes = dict(QUICK if args.quick else FULL)
    for k in sizes:
        v = getattr(args, k)
        if v is not None:
            sizes[k] = v
    return sizes


def main(argv: Sequence[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}
    from multiturn_lib.runners import engine_options
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: a comma-separated subset of {SYSTEMS}, got {args.systems}")
    sizes = resolve_sizes(args)
    options = {"max_num_seqs": sizes["in_flight"], "max_batched_tokens":
               sizes["max_batched_tokens"], "max_model_len": sizes["max_model_len"],
               **engine_options(args.engine_option)}
    result: dict[str, Any] = {**environment(argv, __file__), "args": vars(args),
                              "sizes": sizes, "engine_options": options, "systems": {},
                              "runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-programs-"))
    sources = {"new": Path(args.new_source).resolve()}
    try:
        if "old" in systems:
            where = tmp / "old"
            commit = add_worktree(args.old_commit, where)
            sources["old"] = where
            result["systems"]["old"] = {"commit": commit, "source": "git worktree"}
        if "new" in systems:
            result["systems"]["new"] = {"source": str(sources["new"])}
        rows = []
        for model in args.model:
            caches = {}
            for system in systems:
                prep = prepare_model(model, args.dtype, sources[system], args.timeout)
                result["systems"][system].setdefault("prepare", {})[model] = prep
                caches[system] = Path(prep.get("model_cache") or model_cache_dir())
            for rep in range(args.repeats):
                for system in systems:                      # alternating
                    run = run_system(model, system, rep, sources[system], args, sizes, options,
                                     caches[system])
                    result["runs"].append(run)
                    rows.append(row(run))
                    run["row"] = rows[-1]
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        if "old" in sources:
            remove_worktree(sources["old"])
        shutil.rmtree(tmp, ignore_errors=True)
    result["rows"] = rows
    result["summary"] = summarize(rows)
    print_table(rows, result["summary"])
    if args.out:
        write_json(args.out, result, indent=1)
    return result


if __name__ == "__main__":
    main()
