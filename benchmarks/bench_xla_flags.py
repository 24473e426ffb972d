"""XLA CPU flags side by side: the model runner's prefill and decode steps under each flag set.

    python benchmarks/bench_xla_flags.py --repeats 3 \
        --out benchmarks/results/bench_xla_flags_cpu.json

Each flag set runs benchmarks/model_step.py in a fresh process (XLA reads XLA_FLAGS once per
process), the sets alternating within every repeat (abcabc...), with the machine's load average
before each run. The summary gives each set's median step time and its ratio to the first set
(the baseline; "xla" is XLA's own default: Pensieve sets no XLA flag). The other sets route the
dots to XLA's experimental library backends (XNNPACK, YNNPACK, oneDNN).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import environment, write_json

HERE = Path(__file__).resolve().parent
SETS = {
    "xla": "",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "onednn": "--xla_cpu_use_onednn=true",
}


def run_once(flags: str, args, out: Path) -> dict:
    """One model_step.py run under these XLA_FLAGS."""
    env = dict(os.environ, XLA_FLAGS=flags)
    cmd = [sys.executable, str(HERE / "model_step.py"), "--model", args.model,
           "--prefill", str(args.prefill), "--context", str(args.context),
           "--decode-batch", *map(str, args.decode_batch), "--iters", str(args.iters),
           "--out", str(out)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "loadavg_before": load}
    rows = json.loads(out.read_text())["rows"]
    return {"loadavg_before": load,
            "ms": {f"{r['kind']}_b{r['seqs']}": r["seconds"] * 1e3 for r in rows}}


def summarize(runs: dict[str, list[dict]], base: str) -> dict:
    med = {name: {k: statistics.median(r["ms"][k] for r in rs if "ms" in r)
                  for k in next(r["ms"] for r in rs if "ms" in r)}
           for name, rs in runs.items() if any("ms" in r for r in rs)}
    return {name: {k: {"median_ms": round(v, 2),
                       "ratio_to_" + base: round(med[base][k] / v, 3) if base in med else None}
                   for k, v in m.items()} for name, m in med.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--sets", nargs="+", default=list(SETS), help=f"of {list(SETS)}")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    unknown = [s for s in args.sets if s not in SETS]
    if unknown:
        ap.error(f"--sets: unknown {unknown}; known: {list(SETS)}")
    runs: dict[str, list[dict]] = {s: [] for s in args.sets}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name in args.sets:
                r = run_once(SETS[name], args, Path(tmp) / f"{name}_{rep}.json")
                runs[name].append(r)
                print(f"repeat {rep} {name:8s} load {r['loadavg_before']:.2f} "
                      f"{r.get('ms', r.get('error'))}", flush=True)
    summary = summarize(runs, args.sets[0])
    for name, m in summary.items():
        print(name, {k: (v["median_ms"], v[next(iter(v.keys() - {"median_ms"}))])
                     for k, v in m.items()})
    result = {**environment(argv, __file__), "model": args.model, "flag_sets": {
        s: SETS[s] for s in args.sets}, "runs": runs, "summary": summary}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
