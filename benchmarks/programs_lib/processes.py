"""The parent's side: the old system's git worktree, a fresh cache directory per system and
repeat (converted models linked in), the models converted once beforehand, and the worker
processes (`bench_programs.py --worker SPEC_JSON`) with their exit codes, load average and, on
failure, their last samples and stderr tail."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1]
REPO = BENCHMARKS.parent
SCRIPT = BENCHMARKS / "bench_programs.py"    # its --worker option runs worker.worker(spec)


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, None where the system has none."""
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
    """This environment with src first on PYTHONPATH and, given a cache, PENSIEVE_JAX_CACHE."""
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
    load_before = loadavg()
    t = time.perf_counter()
    spec["spawned_at"] = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--worker", json.dumps(spec)],
                                env=system_env(src, cache), cwd=str(workdir), stderr=err)
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
                "loadavg_before": load_before, "loadavg_after": loadavg()})
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
    """A detached git worktree of commit at where; returns the full commit hash."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), commit],
                   check=True, capture_output=True, text=True)
    return subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def remove_worktree(where: Path) -> None:
    """The worktree removed (forced), its folder deleted, git's worktree list pruned."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
                   capture_output=True, text=True)
    if where.exists():
        shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)
