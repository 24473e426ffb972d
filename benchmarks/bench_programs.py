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

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import workload as wl  # noqa: E402
from common import environment, write_json  # noqa: E402

OLD_COMMIT = "b4dcccf"        # the engine before issue 16: lazy compiling
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
SYSTEMS = ("new", "old")

# the sizes: the replay (48 conversations, 32 in flight, 512-token steps) and a tiny one
FULL = dict(conversations=48, in_flight=32, scale=0.25, max_context=1024, max_model_len=1024,
            max_batched_tokens=512, ttft_turns=8, ttft_user_tokens=72, ttft_reply_tokens=32,
            ttft_repeats=3)
QUICK = dict(conversations=6, in_flight=3, scale=0.1, max_context=192, max_model_len=256,
             max_batched_tokens=32, ttft_turns=3, ttft_user_tokens=16, ttft_reply_tokens=4,
             ttft_repeats=1)


# -- the worker: one process, one engine -------------------------------------------------------

def memory() -> dict[str, float]:
    """This process's memory mappings (lines of /proc/self/maps), RSS and peak RSS (MiB)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/maps", "rb") as f:
            out["maps"] = sum(1 for _ in f)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss_mib" if line.startswith("VmRSS") else "peak_rss_mib"
                    out[key] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


class CompileCounter:
    """Counts XLA compilations of every jitted function through jax.monitoring: number and
    seconds, before and after mark_ready(); compilations served from JAX's persistent cache
    (its cache_hits event comes first, on the same thread) are counted as loads. Works on any
    engine: it only listens to jax."""

    def __init__(self):
        self.ready = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self.counts = {k: {"compiled": 0, "compiled_s": 0.0, "loaded": 0, "loaded_s": 0.0}
                       for k in ("before_ready", "after_ready")}
        self.names: dict[str, dict[str, dict[str, float]]] = {"before_ready": {},
                                                               "after_ready": {}}

    def install(self) -> "CompileCounter":
        from jax import monitoring
        monitoring.register_event_listener(self._on_event)
        monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def _on_event(self, event: str, **_kw) -> None:
        if event == CACHE_HIT_EVENT:
            self._local.hit = True

    def _on_duration(self, event: str, duration: float, **kw) -> None:
        if event != COMPILE_EVENT:
            return
        hit = getattr(self._local, "hit", False)
        self._local.hit = False
        with self._lock:
            phase = "after_ready" if self.ready else "before_ready"
            c = self.counts[phase]
            kind = "loaded" if hit else "compiled"
            c[kind] += 1
            c[kind + "_s"] += float(duration)
            f = self.names[phase].setdefault(str(kw.get("fun_name", "?")),
                                             {"compiled": 0, "loaded": 0, "s": 0.0})
            f[kind] += 1
            f["s"] += float(duration)

    def mark_ready(self) -> None:
        with self._lock:
            self.ready = True

    def total(self) -> int:
        with self._lock:
            return sum(c["compiled"] + c["loaded"] for c in self.counts.values())

    def after_ready(self) -> int:
        with self._lock:
            c = self.counts["after_ready"]
            return c["compiled"] + c["loaded"]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {k: {kk: (round(vv, 3) if isinstance(vv, float) else vv)
                       for kk, vv in c.items()} for k, c in self.counts.items()}
            out["compile_s_total"] = round(sum(c["compiled_s"] + c["loaded_s"]
                                               for c in self.counts.values()), 3)
            out["compilations_after_ready"] = (self.counts["after_ready"]["compiled"]
                                               + self.counts["after_ready"]["loaded"])
            for phase, names in self.names.items():   # the slowest first
                out[phase + "_by_function"] = {
                    k: dict(v, s=round(v["s"], 3)) for k, v in
                    sorted(names.items(), key=lambda kv: -kv[1]["s"])}
            return out


class Sampler:
    """Every interval: memory() and the compile count, appended to a JSON-lines file (read by
    the parent if this process dies) and kept for the peaks."""

    def __init__(self, path: Path, counter: CompileCounter, interval_s: float = 0.5):
        self.path, self.counter, self.interval = path, counter, interval_s
        self.phase = "start"
        self.t0 = time.perf_counter()
        self.peak: dict[str, float] = {}
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def sample(self) -> dict:
        s = {"t_s": round(time.perf_counter() - self.t0, 2), "phase": self.phase, **memory(),
             "compilations": self.counter.total()}
        for k in ("maps", "rss_mib"):
            if k in s:
                self.peak[k] = max(self.peak.get(k, 0), s[k])
        self.samples.append(s)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(s) + "\n")
        except OSError:
            pass
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class PaddingCounter:
    """Real and padded step tokens of an engine whose stats() has no "programs" (the old one):
    wraps runner.step and pads as its runner does (a power-of-two bucket of tokens)."""

    def __init__(self, engine):
        try:
            from pensieve_jax.runner import bucket     # the old engine's flat layout
        except ImportError:
            from pensieve_jax.runner.programs import bucket
        runner = engine.runner
        step, minimum = runner.step, runner.buckets.min_tokens
        self.real = self.padded = 0

        def counted(s, *a, **kw):
            n = len(s.token_ids)
            self.real += n
            self.padded += bucket(n, minimum)
            return step(s, *a, **kw)
        runner.step = counted


def _mem(sample: dict) -> dict:
    return {k: sample[k] for k in ("maps", "rss_mib", "peak_rss_mib") if k in sample}


def _programs(stats: dict) -> dict | None:
    p = stats.get("programs")
    return p if isinstance(p, dict) else None


def _padding(before: dict | None, after: dict | None, fallback: PaddingCounter | None
             ) -> dict[str, Any]:
    """padded / real step tokens over the replay: from stats()["programs"] where the engine has
    it, else from the PaddingCounter."""
    if after is not None and "padded_tokens" in after and "real_tokens" in after:
        padded = after["padded_tokens"] - (before or {}).get("padded_tokens", 0)
        real = after["real_tokens"] - (before or {}).get("real_tokens", 0)
        source = "engine stats"
    elif fallback is not None:
        padded, real, source = fallback.padded, fallback.real, "runner.step wrapper"
    else:
        return {"source": None}
    return {"padded_tokens": int(padded), "real_tokens": int(real),
            "padded_over_real": padded / real if real else None, "source": source}


def _close(engine) -> None:
    for name in ("close", "shutdown"):
        fn = getattr(engine, name, None)
        if callable(fn):
            fn()
            return


def run_replay(engine, spec: dict, counter: CompileCounter, sampler: Sampler) -> dict:
    from multiturn_lib.engine_target import EngineTarget
    from multiturn_lib.metrics import numeric_delta, summarize_pass
    from multiturn_lib.replay import replay
    s = spec["sizes"]
    convs = wl.sharegpt(s["conversations"], seed=spec["seed"], scale=s["scale"],
                        max_context=s["max_context"])
    workload = wl.schedule(convs, math.inf, spec["think_time"], spec["seed"])
    target = EngineTarget(engine, profile_steps=False)
    before = engine.stats()
    pad = None if _programs(before) is not None else PaddingCounter(engine)
    c0, mem0 = counter.after_ready(), memory()
    sampler.phase = "replay"
    run = replay(target, workload, token_seed=spec["seed"], tag="replay",
                 users=s["in_flight"], progress=False)
    sampler.phase = "after replay"
    after = engine.stats()
    summary = summarize_pass(run["records"], run["wall_s"])
    delta = numeric_delta(before, after)
    tokens = summary["tokens"]
    wall = run["wall_s"]
    return {
        "workload": workload.summary(), "wall_s": wall,
        "turns": len(run["records"]),
        "output_tokens_per_s": tokens.get("completion_tokens", 0) / wall,
        "step_tokens_per_s": delta.get("step_tokens", 0) / wall,   # real tokens the model ran
        "requests_per_s": len(run["records"]) / wall,
        "ttft_s": summary["whole_run"]["ttft_s"],
        "e2e_latency_s": summary["whole_run"]["e2e_latency_s"],
        "tokens": tokens, "engine_delta": delta,
        "compilations_during": counter.after_ready() - c0,
        "compilations_during_by_engine": delta.get("compilations"),
        "padding": _padding(_programs(before), _programs(after), pad),
        "memory_before": mem0, "memory_after": _mem(sampler.sample()),
    }


def run_ttft(engine, spec: dict, counter: CompileCounter, sampler: Sampler) -> dict:
    """Turn `ttft_turns` of a conversation alone on the engine: one untimed conversation (its
    numbers are kept as `first_conversation`), then ttft_repeats timed ones; new random ids each
    (no cache shared between them)."""
    import numpy as np
    from multiturn_lib.engine_target import EngineTarget
    s = spec["sizes"]
    target = EngineTarget(engine, profile_steps=False)
    rng = np.random.default_rng(spec["seed"] + 16)
    sampler.phase = "ttft"
    convs = []
    for rep in range(1 + s["ttft_repeats"]):
        c0 = counter.after_ready()
        conv = target.conversation(f"ttft-{rep}", [], None)
        ttfts = []
        try:
            for turn in range(s["ttft_turns"]):
                if turn and spec.get("ttft_think_time"):
                    time.sleep(spec["ttft_think_time"])     # the user reads the reply
                ids = rng.integers(0, target.vocab_size, s["ttft_user_tokens"]).tolist()
                res = conv.turn(ids, None, s["ttft_reply_tokens"])
                ttfts.append(res["ttft_s"])
        finally:
            conv.close()
        convs.append({"ttft_by_turn_s": ttfts, "compilations": counter.after_ready() - c0})
    timed = convs[1:]
    last = [c["ttft_by_turn_s"][-1] for c in timed]
    return {"turn": s["ttft_turns"], "user_tokens": s["ttft_user_tokens"],
            "reply_tokens": s["ttft_reply_tokens"],
            "context_tokens_at_turn": (s["ttft_turns"] - 1) * (s["ttft_user_tokens"]
                                                              + s["ttft_reply_tokens"])
            + s["ttft_user_tokens"],
            "median_s": statistics.median(last) if last else None, "repeats_s": last,
            "first_conversation_s": convs[0]["ttft_by_turn_s"][-1],
            "compilations_while_timed": sum(c["compilations"] for c in timed),
            "conversations": convs}


def _without_editable_finders() -> None:
    """Drop setuptools' editable-install finders: they would resolve a pensieve_jax module the
    PYTHONPATH checkout lacks (the old worktree) from the installed checkout instead."""
    def editable(f) -> bool:
        return (getattr(f, "__module__", None) or type(f).__module__).startswith("__editable__")
    sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]


def worker(spec: dict) -> None:
    """One process: start the engine (timed), then the phases in spec["phases"]; the result
    JSON is rewritten after every phase, so a process that dies leaves what it measured."""
    t_start = time.perf_counter()
    out = Path(spec["out"])
    result: dict[str, Any] = {"system": spec["system"], "role": spec["role"], "phases": []}

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float))
        tmp.replace(out)

    _without_editable_finders()
    import jax
    counter = CompileCounter().install()
    import pensieve_jax
    if not Path(pensieve_jax.__file__).resolve().is_relative_to(Path(spec["source"]).resolve()):
        raise SystemExit(f"pensieve_jax came from {pensieve_jax.__file__}, not {spec['source']}")
    from pensieve_jax import Engine, EngineConfig     # (every layout exports them)
    from common import git_commit
    result["pensieve_jax"] = str(Path(pensieve_jax.__file__).parent)
    result["git_commit"] = git_commit()
    result["env"] = {k: os.environ.get(k) for k in ("PENSIEVE_JAX_CACHE",
                                                     "PENSIEVE_JAX_PRECOMPILE")}
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    has_cache = (Path(pensieve_jax.__file__).parent / "compile_cache.py").exists()
    result["api"] = {"precompile_option": "precompile" in fields,
                     "warm_up": hasattr(Engine, "warm_up"), "compile_cache": has_cache}
    options = {k: v for k, v in spec["engine_options"].items() if k in fields}
    result["engine_options"] = options
    result["engine_options_unknown"] = sorted(set(spec["engine_options"]) - fields)
    result["import_s"] = time.perf_counter() - t_start
    sampler = Sampler(Path(spec["samples"]), counter).start()
    mem0 = memory()
    t0 = time.perf_counter()
    sampler.phase = "startup"
    engine = Engine.from_pretrained(spec["model"], spec["dtype"], **options)
    ready_s = time.perf_counter() - t0
    counter.mark_ready()
    sampler.phase = "ready"
    stats = engine.stats()
    result["startup"] = {
        "from_pretrained_s": ready_s,
        "process_to_ready_s": time.time() - spec.get("spawned_at", time.time()),
        "memory_before": mem0, "memory_ready": _mem(sampler.sample()),
        "compiles": counter.snapshot(), "engine_programs": _programs(stats),
        "engine_compilations": stats.get("compilations")}
    result["jax"] = jax.__version__
    result["phases"].append("startup")
    print(f"[{spec['label']}] ready in {ready_s:.1f} s, "
          f"{result['startup']['compiles']['before_ready']['compiled']} compiled, "
          f"{result['startup']['compiles']['before_ready']['loaded']} loaded from cache",
          flush=True)
    save()
    try:
        for phase, fn in (("replay", run_replay), ("ttft", run_ttft)):
            if phase in spec["phases"]:
                result[phase] = fn(engine, spec, counter, sampler)
                result["phases"].append(phase)
                print(f"[{spec['label']}] {phase} done: {_phase_line(phase, result[phase])}",
                      flush=True)
                save()
        stats = engine.stats()
        result["engine_programs"] = _programs(stats)
        result["engine_compilations"] = stats.get("compilations")
    finally:
        sampler.stop()
        result["compiles"] = counter.snapshot()
        result["memory_end"] = memory()
        result["memory_peak"] = dict(sampler.peak)
        result["samples"] = _thin(sampler.samples, 60)
        save()
    t = time.perf_counter()
    _close(engine)
    result["close_s"] = time.perf_counter() - t
    result["phases"].append("closed")
    save()


def _phase_line(phase: str, r: dict) -> str:
    if phase == "replay":
        pad = r["padding"].get("padded_over_real")
        return (f"{r['wall_s']:.1f} s, {r['output_tokens_per_s']:.1f} out tok/s, "
                f"{r['compilations_during']} compilations, padding "
                f"{'-' if pad is None else f'{pad:.2f}'}, maps {r['memory_after'].get('maps')}")
    return (f"turn {r['turn']} TTFT median {_ms(r['median_s'])} ms (first conversation "
            f"{_ms(r['first_conversation_s'])} ms)")


def _thin(samples: list[dict], n: int) -> list[dict]:
    if len(samples) <= n:
        return samples
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n)] + [samples[-1]]


# -- the parent: worktree, cache directories, processes, the table ------------------------------

def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def model_cache_dir() -> Path:
    """Where pensieve_jax.weights keeps converted models (its default_cache_dir())."""
    return Path(os.environ.get("PENSIEVE_JAX_CACHE", Path.home() / ".cache" / "pensieve-jax"))


def link_models(into: Path, source: Path) -> list[str]:
    """Converted models (folders with pensieve_model.json) of the user's cache, linked into a
    fresh cache directory: a cold start then compiles cold, but does not convert the model."""
    linked = []
    if source.is_dir():
        for entry in sorted(source.iterdir()):
            if (entry / "pensieve_model.json").exists():
                (into / entry.name).symlink_to(entry.resolve())
                linked.append(entry.name)
    return linked


def system_env(src: Path, cache: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    if cache is not None:
        env["PENSIEVE_JAX_CACHE"] = str(cache)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)   # it would win over PENSIEVE_JAX_CACHE
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def prepare_model(model: str, dtype: str, src: Path, timeout: float) -> dict:
    """Convert a GGUF / HF model into the user's model cache once (with this system's code),
    so the timed start-ups only load it; returns where that cache is (`model_cache`)."""
    if model.startswith("random:"):
        return {"skipped": "random weights"}
    t = time.perf_counter()
    code = ("import sys; from pensieve_jax.weights import load_model, default_cache_dir; "
            "load_model(sys.argv[1], sys.argv[2]); print(default_cache_dir())")
    p = subprocess.run([sys.executable, "-c", code, model, dtype], env=system_env(src, None),
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise SystemExit(f"loading {model} with {src} failed:\n{p.stderr[-3000:]}")
    return {"seconds": time.perf_counter() - t,
            "model_cache": p.stdout.strip().splitlines()[-1]}


def converted_models(cache: Path) -> list[str]:
    """Models converted into a fresh cache directory by a timed process (not linked): their
    conversion is then part of its start-up."""
    return sorted(str(m.parent.relative_to(cache)) for pattern in ("*/pensieve_model.json",
                                                                    "*/*/pensieve_model.json")
                  for m in cache.glob(pattern) if not m.parent.is_symlink())


def run_process(spec: dict, src: Path, cache: Path, workdir: Path, timeout: float) -> dict:
    """One worker process; its result (complete or partial), exit code, load average, and on
    failure its last samples and stderr tail."""
    out, samples, log = (workdir / f"{spec['label']}.{k}" for k in ("json", "samples", "log"))
    spec = dict(spec, out=str(out), samples=str(samples))
    load_before = _loadavg()
    t = time.perf_counter()
    spec["spawned_at"] = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                 json.dumps(spec)], env=system_env(src, cache),
                                cwd=str(workdir), stderr=err)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
    res: dict[str, Any] = {}
    if out.exists():
        res = json.loads(out.read_text())
    if isinstance(rc, int) and rc < 0:          # killed by a signal: the shell's 128 + N
        res["signal"] = signal.Signals(-rc).name
        rc = 128 - rc
    res.update({"exit_code": rc, "process_s": time.perf_counter() - t,
                "loadavg_before": load_before, "loadavg_after": _loadavg()})
    completed = set(res.get("phases", [])) >= set(spec["phases"]) | {"startup"}
    res["completed"] = completed
    if rc != 0 or not completed:
        lines = samples.read_text().splitlines() if samples.exists() else []
        rows = [json.loads(x) for x in lines if x.strip()]
        res["last_samples"] = rows[-5:]
        res["peak_maps_sampled"] = max((r.get("maps", 0) for r in rows), default=None)
        res["stderr_tail"] = log.read_text(errors="replace")[-4000:]
        print(f"[{spec['label']}] exit {rc}, phases {res.get('phases')}; peak maps "
              f"{res['peak_maps_sampled']}; stderr tail:\n{res['stderr_tail'][-800:]}",
              flush=True)
    return res


def run_system(model: str, system: str, rep: int, src: Path, args, sizes: dict,
               options: dict, model_cache: Path) -> dict:
    """The cold process (start-up + replay) and the warm one (start-up + TTFT) of one system
    over one fresh cache directory."""
    with tempfile.TemporaryDirectory(prefix=f"bench-programs-{system}-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        cache.mkdir()
        linked = link_models(cache, model_cache)
        base = {"model": model, "dtype": args.dtype, "system": system, "source": str(src),
                "sizes": sizes,
                "engine_options": options, "seed": args.seed, "think_time": args.think_time,
                "ttft_think_time": args.ttft_think_time}
        short = model.split(":")[-1].split("/")[-1][:20]
        run: dict[str, Any] = {"model": model, "system": system, "repeat": rep,
                               "source": str(src), "linked_models": linked}
        for role, phases in (("cold", ["replay"]), ("warm", ["ttft"])):
            if role == "cold" and args.no_replay:
                phases = []
            if role == "warm" and args.no_ttft:
                phases = []
            label = f"{system}-{role}-{short}-r{rep}"
            run[role] = run_process(dict(base, role=role, phases=phases, label=label), src,
                                    cache, tmp, args.timeout)
        run["cache_files"] = sum(1 for p in cache.rglob("*") if p.is_file())
        run["converted_during_startup"] = converted_models(cache)
    return run


def add_worktree(commit: str, where: Path) -> str:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), commit],
                   check=True, capture_output=True, text=True)
    return subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def remove_worktree(where: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
                   capture_output=True, text=True)
    if where.exists():
        shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)


# -- numbers out of a run ------------------------------------------------------------------------

def _get(d: Any, *path, default=None):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def row(run: dict) -> dict[str, Any]:
    """The headline numbers of one run (None where a process did not get there)."""
    cold, warm = run.get("cold", {}), run.get("warm", {})
    replay = cold.get("replay", {})
    programs = cold.get("engine_programs") or _get(cold, "startup", "engine_programs")
    return {
        "model": run["model"], "system": run["system"], "repeat": run["repeat"],
        "exit_codes": [cold.get("exit_code"), warm.get("exit_code")],
        "completed": bool(cold.get("completed")) and bool(warm.get("completed")),
        "startup_cold_s": _get(cold, "startup", "from_pretrained_s"),
        "startup_warm_s": _get(warm, "startup", "from_pretrained_s"),
        "compiled_before_ready": _get(cold, "startup", "compiles", "before_ready", "compiled"),
        "loaded_before_ready_warm": _get(warm, "startup", "compiles", "before_ready", "loaded"),
        "compilations_after_ready": _get(cold, "compiles", "compilations_after_ready"),
        "compile_s": _get(cold, "compiles", "compile_s_total"),
        "engine_program_count": (programs or {}).get("count"),
        "engine_compilations_after_ready": (programs or {}).get("compilations_after_ready"),
        "engine_warm": (programs or {}).get("warm"),
        "replay_turns": replay.get("turns"),
        "replay_wall_s": replay.get("wall_s"),
        "output_tokens_per_s": replay.get("output_tokens_per_s"),
        "step_tokens_per_s": replay.get("step_tokens_per_s"),
        "padded_over_real": _get(replay, "padding", "padded_over_real"),
        "maps_ready": _get(cold, "startup", "memory_ready", "maps"),
        "maps_after_replay": _get(replay, "memory_after", "maps"),
        "maps_peak": _get(cold, "memory_peak", "maps", default=cold.get("peak_maps_sampled")),
        "rss_ready_mib": _get(cold, "startup", "memory_ready", "rss_mib"),
        "rss_after_replay_mib": _get(replay, "memory_after", "rss_mib"),
        "ttft_turn_s": _get(warm, "ttft", "median_s"),
        "ttft_turn_first_s": _get(warm, "ttft", "first_conversation_s"),
        "warm_compilations_after_ready": _get(warm, "compiles", "compilations_after_ready"),
        "loadavg": [cold.get("loadavg_before"), cold.get("loadavg_after"),
                    warm.get("loadavg_after")],
    }


def _median(xs):
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
            per[system] = {k: _median([r[k] for r in rs]) for k in keys}
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


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


COLUMNS = (   # header, width, the cell of a row
    ("model", 22, lambda r: r["model"][:22]),
    ("sys", 3, lambda r: r["system"]),
    ("r", 1, lambda r: str(r["repeat"])),
    ("exit c/w", 9, lambda r: "/".join(str(x) for x in r["exit_codes"])),
    ("start c/w s", 11, lambda r: f"{_f(r['startup_cold_s'])}/{_f(r['startup_warm_s'])}"),
    ("compiled pre/post", 17, lambda r: f"{_f(r['compiled_before_ready'], '{}')}/"
                                        f"{_f(r['compilations_after_ready'], '{}')}"),
    ("comp s", 7, lambda r: _f(r["compile_s"])),
    ("replay s", 8, lambda r: _f(r["replay_wall_s"])),
    ("out t/s", 7, lambda r: _f(r["output_tokens_per_s"])),
    ("pad", 5, lambda r: _f(r["padded_over_real"], "{:.2f}")),
    ("maps rdy/end/peak", 19, lambda r: "/".join(_f(r[k], "{}") for k in (
        "maps_ready", "maps_after_replay", "maps_peak"))),
    ("RSS MiB rdy/end", 15, lambda r: f"{_f(r['rss_ready_mib'], '{:.0f}')}/"
                                      f"{_f(r['rss_after_replay_mib'], '{:.0f}')}"),
    ("TTFT ms", 7, lambda r: _ms(r["ttft_turn_s"])),
)


def print_table(rows: list[dict], summary: dict) -> None:
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
